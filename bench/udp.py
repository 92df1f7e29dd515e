"""UDP benchmark: Bilayer's UDP listener against nginx `stream` UDP proxying and direct,
with dnsperf (Debian) as the client and dnsmasq (Debian) as the DNS server, same run.

    .venv/bin/python bench/udp.py [--rounds 3] [--seconds 10] [--clients 8]

One core each: the proxy (Bilayer's one event loop, nginx's one worker) is pinned to core
1, dnsperf and dnsmasq to core 0 (for "direct" the proxy's core is idle). dnsperf sends
from `--clients` sockets (so the proxies hold that many sessions) with at most 100
queries outstanding. Reports the median queries/s of the rounds (orders alternate), the
ratio to nginx, and the proxy's CPU time per datagram (user + system, from /proc, over
the queries answered x 2 datagrams).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BILAYER, Series, free_port, need, process, save, workdir

PROXY_CORE, LOAD_CORE = "1", "0"
OUTSTANDING = 100
NGINX_STREAM = """
load_module {module};
worker_processes 1;
daemon off;
pid {dir}/nginx-udp.pid;
error_log {dir}/nginx-udp-error.log error;
events {{ worker_connections 8192; }}
stream {{
    server {{
        listen 127.0.0.1:{port} udp;
        proxy_pass 127.0.0.1:{backend};
        proxy_timeout 10s;
    }}
}}
"""

MANIFESTS = """apiVersion: v1
kind: Service
metadata: {{name: dns, namespace: bench}}
spec:
  ports: [{{name: dns, port: 53, targetPort: {backend}, protocol: UDP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: dns, namespace: bench, labels: {{kubernetes.io/service-name: dns}}}}
addressType: IPv4
ports: [{{name: dns, port: {backend}, protocol: UDP}}]
endpoints: [{{addresses: [127.0.0.1]}}]
---
apiVersion: bilayer.dev/v1alpha1
kind: L4Listener
metadata: {{name: dns, namespace: bench}}
spec:
  port: {port}
  protocol: UDP
  backendRefs: [{{name: dns, port: 53}}]
"""


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def answers(port: int, timeout: float = 20.0) -> None:
    """Wait until a DNS query to port is answered."""
    query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05bench\x04test\x00\x00\x01\x00\x01"
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        while time.monotonic() < deadline:
            s.sendto(query, ("127.0.0.1", port))
            try:
                s.recv(512)
                return
            except OSError:
                continue
    raise RuntimeError(f"no DNS answer on {port}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dnsperf(port: int, seconds: int, clients: int, data: Path) -> tuple[float, int, int]:
    """queries/s, queries completed, queries lost."""
    binary = need("dnsperf", "dnsperf")
    args = ["taskset", "-c", LOAD_CORE, binary, "-s", "127.0.0.1", "-p", str(port), "-d", str(data)]
    args += ["-c", str(clients), "-T", "1", "-l", str(seconds), "-q", str(OUTSTANDING), "-t", "2"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    qps = re.search(r"Queries per second:\s+([\d.]+)", out)
    done = re.search(r"Queries completed:\s+(\d+)", out)
    lost = re.search(r"Queries lost:\s+(\d+)", out)
    assert qps and done and lost, out
    return float(qps[1]), int(done[1]), int(lost[1])


@contextmanager
def dnsmasq(directory: Path) -> Iterator[int]:
    binary = need("dnsmasq", "dnsmasq")
    port = free_udp_port()
    args = ["taskset", "-c", LOAD_CORE, binary, "--keep-in-foreground", "--user=root", "--port", str(port)]
    args += ["--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts", "--pid-file"]
    args += ["--conf-file=/dev/null", "--address=/bench.test/192.0.2.1", "--cache-size=0"]
    with process(args):
        answers(port)
        yield port


@contextmanager
def nginx_stream(directory: Path, backend: int) -> Iterator[tuple[int, int]]:
    binary = need("nginx", "nginx-light")
    module = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
    if not module.exists():
        raise SystemExit("the nginx stream module is missing: apt-get install libnginx-mod-stream")
    port = free_udp_port()
    conf = directory / "nginx-udp.conf"
    conf.write_text(NGINX_STREAM.format(module=module, dir=directory, port=port, backend=backend))
    with process(["taskset", "-c", PROXY_CORE, binary, "-c", str(conf), "-p", str(directory)]) as proc:
        answers(port)
        worker = _child(proc.pid)
        yield port, worker


def _child(pid: int) -> int:
    """nginx's worker: the process doing the work."""
    for _ in range(100):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    return pid


@contextmanager
def bilayer(directory: Path, backend: int) -> Iterator[tuple[int, int]]:
    port = free_udp_port()
    folder = directory / "objects-udp"
    folder.mkdir(exist_ok=True)
    (folder / "bench.yaml").write_text(MANIFESTS.format(backend=backend, port=port))
    args = ["taskset", "-c", PROXY_CORE, str(BILAYER), "run", "-f", str(folder), "--address", "127.0.0.1"]
    args += ["--admin-port", str(free_port()), "--no-access-log", "--log-level", "warning"]
    with process(args) as proc:
        answers(port, timeout=60)
        yield port, proc.pid


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    directory = workdir()
    data = directory / "queries.txt"
    data.write_text("".join(f"host{i}.bench.test A\n" for i in range(1000)))
    qps, cpu = Series(), Series()
    with (
        dnsmasq(directory) as backend,
        nginx_stream(directory, backend) as ng,
        bilayer(directory, backend) as bl,
    ):
        targets = {"direct": (backend, None), "nginx": ng, "bilayer": bl}
        for round_number in range(args.rounds):
            order = list(targets) if round_number % 2 == 0 else list(reversed(targets))
            for name in order:
                port, pid = targets[name]
                before = cpu_seconds(pid) if pid else 0.0
                rate, done, lost = dnsperf(port, args.seconds, args.clients, data)
                used = cpu_seconds(pid) - before if pid else 0.0
                qps.add(name, rate)
                if pid:
                    cpu.add(name, used / (2 * done) * 1e6)
                print(
                    f"round {round_number + 1}: {name}: {rate:,.0f} q/s, {lost} lost, {used:.2f} s CPU",
                    flush=True,
                )
    nginx_qps = qps.median("nginx")
    print()
    print("| target | queries/s | ratio to nginx | ratio to direct | proxy CPU per datagram |")
    print("|---|---:|---:|---:|---:|")
    for name in ("direct", "nginx", "bilayer"):
        value = qps.median(name)
        per = f"{cpu.median(name):.1f} µs" if name in cpu.rounds else ""
        direct = value / qps.median("direct")
        print(f"| {name} | {value:,.0f} | {value / nginx_qps:.2f}x | {direct:.2f}x | {per} |")
    print(f"\nraw: {save('udp', {'qps': qps.rounds, 'cpu_us_per_datagram': cpu.rounds})}")


if __name__ == "__main__":
    main()
