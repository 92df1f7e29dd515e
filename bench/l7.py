"""L7 benchmark: Bilayer's HTTP routing against HAProxy `mode http`, same backend, same load.

    .venv/bin/python bench/l7.py [--rounds 3] [--seconds 10]

HAProxy: one thread (Bilayer runs one event loop), keep-alive to the backend with
`http-reuse always`. Bilayer: access log off (HAProxy logs nothing either), with 10,
1,000 and 10,000 routes on distinct hostnames; the load asks for a host in the middle.
Keep-alive and `Connection: close` clients. Reports medians and ratios to HAProxy.
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
    bilayer_run,
    free_port,
    haproxy,
    nginx,
    save,
    service,
    table,
    workdir,
    wrk,
)

HAPROXY_HTTP = """global
    nbthread 1
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
    args = parser.parse_args()
    directory = workdir()
    counts = (10, 1000, 10000)
    ports = {"haproxy": free_port(), **{f"bilayer-{n}": free_port() for n in counts}}
    keep_alive, keep_latency, closing, closing_latency = Series(), Series(), Series(), Series()
    with contextlib.ExitStack() as stack:
        nginx_port = stack.enter_context(nginx(directory))
        hap = HAPROXY_HTTP.format(port=ports["haproxy"], nginx=nginx_port)
        stack.enter_context(haproxy(directory, hap, [ports["haproxy"]]))
        for n in counts:
            folder = directory / f"routes-{n}"
            folder.mkdir()
            manifests = service("nginx", 80, nginx_port) + routes(n, ports[f"bilayer-{n}"])
            stack.enter_context(bilayer_run(folder, manifests, [ports[f"bilayer-{n}"]]))
        targets = ["haproxy", *(f"bilayer-{n}" for n in counts)]
        hosts = {"haproxy": "h0.example.com", **{f"bilayer-{n}": f"h{n // 2}.example.com" for n in counts}}
        for target in targets:  # warm up
            wrk(f"http://127.0.0.1:{ports[target]}/api/x", seconds=2, headers=[f"Host: {hosts[target]}"])
        for round_index in range(args.rounds):
            order = targets if round_index % 2 == 0 else list(reversed(targets))
            for target in order:
                url = f"http://127.0.0.1:{ports[target]}/api/x"
                host = f"Host: {hosts[target]}"
                result = wrk(url, connections=args.connections, seconds=args.seconds, headers=[host])
                keep_alive.add(target, result.requests_per_second)
                keep_latency.add(target, result.p99_ms)
                if target in ("haproxy", "bilayer-10"):
                    closed = wrk(
                        url,
                        connections=args.connections,
                        seconds=args.seconds,
                        headers=[host, "Connection: close"],
                    )
                    closing.add(target, closed.requests_per_second)
                    closing_latency.add(target, closed.p99_ms)
                print(
                    f"round {round_index + 1} {target:14} keep-alive "
                    f"{result.requests_per_second:>9,.0f} req/s p99 {result.p99_ms:.2f} ms",
                    flush=True,
                )

    def rows(metric: str, series: Series, unit: str) -> list[tuple[str, str, float, float | None, str]]:
        base = series.median("haproxy")
        return [(metric, t, series.median(t), series.median(t) / base, unit) for t in series.rounds]

    report = table(
        f"L7, wrk -t1 -c{args.connections} -d{args.seconds}s, {args.rounds} rounds, medians",
        rows("keep-alive", keep_alive, "req/s")
        + rows("keep-alive p99", keep_latency, "ms")
        + rows("Connection: close", closing, "req/s")
        + rows("Connection: close p99", closing_latency, "ms"),
    )
    scale = keep_alive.median("bilayer-10000") / keep_alive.median("bilayer-10")
    report += f"\n\n10,000 routes vs 10 routes (keep-alive req/s): {scale:.2f}x\n"
    print()
    print(report)
    raw = {
        "keep_alive": keep_alive,
        "keep_latency": keep_latency,
        "close": closing,
        "close_latency": closing_latency,
    }
    print(f"raw results: {save('l7', raw)}")
    subprocess.run(["rm", "-rf", str(directory)], check=False)


if __name__ == "__main__":
    main()
