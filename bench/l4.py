"""L4 benchmark: Bilayer's TCP forwarding against HAProxy `mode tcp`, same backend, same load.

    .venv/bin/python bench/l4.py [--rounds 3] [--seconds 10]

HAProxy runs with one thread (Bilayer runs one event loop) in two configurations, with
and without splice in both directions; each ratio is against the better of the two for
that measurement, so Bilayer is compared with HAProxy at its best. Reports medians.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    Series,
    bilayer_run,
    free_port,
    haproxy,
    need,
    nginx,
    process,
    redis_benchmark,
    save,
    service,
    table,
    workdir,
    wrk,
)

HAPROXY_TCP = """global
    nbthread 1
    maxconn 4000
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
{splice}
frontend http_in
    bind 127.0.0.1:{http}
    default_backend nginx
backend nginx
    server n1 127.0.0.1:{nginx}
frontend redis_in
    bind 127.0.0.1:{redis_in}
    default_backend redis
backend redis
    server r1 127.0.0.1:{redis}
"""


def l4(name: str, port: int, service_name: str) -> str:
    return f"""apiVersion: bilayer.dev/v1alpha1
kind: L4Listener
metadata: {{name: {name}, namespace: bench}}
spec: {{port: {port}, backendRefs: [{{name: {service_name}, port: 80}}]}}
---
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    directory = workdir()
    redis_port = free_port()
    redis = [
        need("redis-server", "redis-server"),
        "--port",
        str(redis_port),
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    names = ("hap_http", "hap_redis", "hs_http", "hs_redis", "bl_http", "bl_redis")
    ports = {name: free_port() for name in names}
    small, big, redis16, redis1 = Series(), Series(), Series(), Series()
    latency = Series()
    with nginx(directory) as nginx_port, process(redis, redis_port, cwd=directory):
        hap = HAPROXY_TCP.format(
            http=ports["hap_http"], nginx=nginx_port, redis_in=ports["hap_redis"], redis=redis_port, splice=""
        )
        hap_splice = HAPROXY_TCP.format(
            http=ports["hs_http"],
            nginx=nginx_port,
            redis_in=ports["hs_redis"],
            redis=redis_port,
            splice="    option splice-request\n    option splice-response",
        )
        splice_dir = directory / "splice"
        splice_dir.mkdir()
        manifests = (
            service("nginx", 80, nginx_port)
            + service("redis", 80, redis_port)
            + l4("http", ports["bl_http"], "nginx")
            + l4("redis", ports["bl_redis"], "redis")
        )
        with (
            haproxy(directory, hap, [ports["hap_http"], ports["hap_redis"]]),
            haproxy(splice_dir, hap_splice, [ports["hs_http"], ports["hs_redis"]]),
            bilayer_run(directory, manifests, [ports["bl_http"], ports["bl_redis"]]),
        ):
            targets = {
                "direct": (nginx_port, redis_port),
                "haproxy": (ports["hap_http"], ports["hap_redis"]),
                "haproxy-splice": (ports["hs_http"], ports["hs_redis"]),
                "bilayer": (ports["bl_http"], ports["bl_redis"]),
            }
            for http, _ in targets.values():  # warm up
                wrk(f"http://127.0.0.1:{http}/", connections=args.connections, seconds=2)
            for round_index in range(args.rounds):
                order = list(targets) if round_index % 2 == 0 else list(reversed(targets))
                for name in order:
                    http, rport = targets[name]
                    result = wrk(
                        f"http://127.0.0.1:{http}/", connections=args.connections, seconds=args.seconds
                    )
                    small.add(name, result.requests_per_second)
                    latency.add(name, result.p99_ms)
                    bulk = wrk(f"http://127.0.0.1:{http}/big", connections=8, seconds=args.seconds)
                    big.add(name, bulk.transfer_per_second / 1e6)
                    redis16.add(name, redis_benchmark(rport, 16))
                    redis1.add(name, redis_benchmark(rport, 1, requests=200000))
                    print(
                        f"round {round_index + 1} {name:14} {result.requests_per_second:>9,.0f} req/s "
                        f"p99 {result.p99_ms:.2f} ms  bulk {bulk.transfer_per_second / 1e6:,.0f} MB/s  "
                        f"redis -P16 {redis16.rounds[name][-1]:,.0f} "
                        f"-P1 {redis1.rounds[name][-1]:,.0f} ops/s",
                        flush=True,
                    )

    def rows(
        metric: str, series: Series, unit: str, lower_is_better: bool = False
    ) -> list[tuple[str, str, float, float | None, str]]:
        both = [series.median("haproxy"), series.median("haproxy-splice")]
        base = min(both) if lower_is_better else max(both)
        targets = ("direct", "haproxy", "haproxy-splice", "bilayer")
        return [(metric, t, series.median(t), series.median(t) / base, unit) for t in targets]

    report = table(
        f"L4, wrk -t1 -c{args.connections} -d{args.seconds}s, {args.rounds} rounds, medians",
        rows("small responses", small, "req/s")
        + rows("p99 latency", latency, "ms", lower_is_better=True)
        + rows("1 MiB objects, wrk -c8", big, "MB/s")
        + rows("redis-benchmark -P 16 (SET+GET)", redis16, "ops/s")
        + rows("redis-benchmark -P 1 (SET+GET)", redis1, "ops/s"),
    )
    direct_ratio = redis16.median("bilayer") / redis16.median("direct")
    report += f"\n\nRedis pipelined through Bilayer: {direct_ratio:.2f}x of direct.\n"
    print()
    print(report)
    path = save("l4", {"small": small, "latency": latency, "big": big, "redis16": redis16, "redis1": redis1})
    print(f"raw results: {path}")
    subprocess.run(["rm", "-rf", str(directory)], check=False)


if __name__ == "__main__":
    main()
