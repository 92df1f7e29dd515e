"""L4 benchmark: Bilayer's TCP forwarding against HAProxy `mode tcp`, same backend, same load.

    .venv/bin/python bench/l4.py [--rounds 3] [--seconds 10]

HAProxy runs with one thread (Bilayer runs one event loop) in two configurations, with
and without splice in both directions; each throughput ratio is against the better of the
two for that measurement, so Bilayer is compared with HAProxy at its best. HAProxy
`nbthread 2` too, and Bilayer `--workers 2` (`bilayer-2w`) when this checkout's CLI has it.
Then, per target, the proxy's CPU time (utime + stime of its process tree, from /proc) per
request, MB or Redis op, with ratios to HAProxy with one thread and no splice: unlike the
rates, it does not depend on what the load generator leaves the proxy of the 2 cores.
Reports medians.
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
    nbthread {threads}
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
    workers = bilayer_accepts("--workers")
    if not workers:
        print("note: this bilayer has no --workers option: Bilayer runs its one process, no 2-worker row")
    measures = ("small", "latency", "big", "redis16", "redis1")
    rate = {m: Series() for m in measures}
    cpu = {m: Series() for m in measures if m != "latency"}
    requests = {"redis16": 400000, "redis1": 200000}
    # target -> (HTTP port, Redis port, pid whose process tree is the proxy, or 0 for none)
    targets: dict[str, tuple[int, int, int]] = {}
    with contextlib.ExitStack() as stack:
        nginx_port = stack.enter_context(nginx(directory))
        stack.enter_context(process(redis, redis_port, cwd=directory))
        targets["direct"] = (nginx_port, redis_port, 0)
        splice = "    option splice-request\n    option splice-response"
        for name, threads, options in (
            ("haproxy", 1, ""),
            ("haproxy-splice", 1, splice),
            ("haproxy-2t", 2, ""),
        ):
            http, redis_in = free_port(), free_port()
            config = HAPROXY_TCP.format(
                threads=threads,
                http=http,
                nginx=nginx_port,
                redis_in=redis_in,
                redis=redis_port,
                splice=options,
            )
            proc = stack.enter_context(haproxy(directory, config, [http, redis_in], name=name))
            targets[name] = (http, redis_in, proc.pid)
        for name, count in (("bilayer", 1), *((("bilayer-2w", 2),) if workers else ())):
            http, redis_in = free_port(), free_port()
            folder = directory / name
            folder.mkdir()
            manifests = (
                service("nginx", 80, nginx_port)
                + service("redis", 80, redis_port)
                + l4("http", http, "nginx")
                + l4("redis", redis_in, "redis")
            )
            flags = ["--workers", str(count)] if workers else []
            proc = stack.enter_context(bilayer_run(folder, manifests, [http, redis_in], flags))
            targets[name] = (http, redis_in, proc.pid)
        for http, _, _ in targets.values():  # warm up
            wrk(f"http://127.0.0.1:{http}/", connections=args.connections, seconds=2)
        for round_index in range(args.rounds):
            order = list(targets) if round_index % 2 == 0 else list(reversed(targets))
            for name in order:
                http, rport, pid = targets[name]
                with cpu_meter(pid) as spent:
                    result = wrk(
                        f"http://127.0.0.1:{http}/", connections=args.connections, seconds=args.seconds
                    )
                rate["small"].add(name, result.requests_per_second)
                rate["latency"].add(name, result.p99_ms)
                cpu["small"].add(name, spent[0] / result.requests * 1e6)
                with cpu_meter(pid) as spent:
                    bulk = wrk(f"http://127.0.0.1:{http}/big", connections=8, seconds=args.seconds)
                rate["big"].add(name, bulk.transfer_per_second / 1e6)
                cpu["big"].add(name, spent[0] / (bulk.requests * 1.048576) * 1e6)  # per MB
                for measure, depth in (("redis16", 16), ("redis1", 1)):
                    with cpu_meter(pid) as spent:
                        rate[measure].add(name, redis_benchmark(rport, depth, requests=requests[measure]))
                    cpu[measure].add(name, spent[0] / (2 * requests[measure]) * 1e6)
                print(
                    f"round {round_index + 1} {name:14} {result.requests_per_second:>9,.0f} req/s "
                    f"({cpu['small'].rounds[name][-1]:.1f} µs CPU/req) p99 {result.p99_ms:.2f} ms  "
                    f"bulk {bulk.transfer_per_second / 1e6:,.0f} MB/s  "
                    f"redis -P16 {rate['redis16'].rounds[name][-1]:,.0f} "
                    f"-P1 {rate['redis1'].rounds[name][-1]:,.0f} ops/s",
                    flush=True,
                )

    def rows(
        metric: str, series: Series, unit: str, lower_is_better: bool = False
    ) -> list[tuple[str, str, float, float | None, str]]:
        both = [series.median("haproxy"), series.median("haproxy-splice")]
        base = min(both) if lower_is_better else max(both)
        return [(metric, t, series.median(t), series.median(t) / base, unit) for t in series.rounds]

    report = table(
        f"L4, wrk -t1 -c{args.connections} -d{args.seconds}s, {args.rounds} rounds, medians",
        rows("small responses", rate["small"], "req/s")
        + rows("p99 latency", rate["latency"], "ms", lower_is_better=True)
        + rows("1 MiB objects, wrk -c8", rate["big"], "MB/s")
        + rows("redis-benchmark -P 16 (SET+GET)", rate["redis16"], "ops/s")
        + rows("redis-benchmark -P 1 (SET+GET)", rate["redis1"], "ops/s"),
    )
    direct_ratio = rate["redis16"].median("bilayer") / rate["redis16"].median("direct")
    report += f"\n\nRedis pipelined through Bilayer: {direct_ratio:.2f}x of direct.\n"
    names = list(targets)
    for measure, title, rate_unit, cpu_unit in (
        ("small", "small responses (wrk -c64)", "req/s", "µs/req"),
        ("big", "1 MiB objects (wrk -c8)", "MB/s", "µs/MB"),
        ("redis16", "redis-benchmark -P 16", "ops/s", "µs/op"),
        ("redis1", "redis-benchmark -P 1", "ops/s", "µs/op"),
    ):
        report += "\n" + cpu_table(
            f"L4 proxy CPU, {title}, ratios to HAProxy (one thread, no splice)",
            names,
            rate[measure],
            cpu[measure],
            "haproxy",
            rate_unit=rate_unit,
            cpu_unit=cpu_unit,
        )
        report += "\n"
    print()
    print(report)
    raw = {**{m: rate[m] for m in measures}, **{f"{m}_cpu_us": cpu[m] for m in cpu}}
    print(f"raw results: {save('l4', raw)}")
    subprocess.run(["rm", "-rf", str(directory)], check=False)


if __name__ == "__main__":
    main()
