"""Two checkouts of Bilayer's L7 path side by side, with HAProxy, in the same run.

    .venv/bin/python bench/compare_l7.py --old /path/to/older/checkout [--rounds 6 --seconds 8]
        [--close] [--variant NAME="FLAGS" ...]

Each checkout serves one L7Route through `bilayer run` (its own code: PYTHONPATH points at
it), in front of the same nginx; rounds alternate their order; wrk -t1 -c64 keep-alive (or
`Connection: close` with --close). Prints each round and the medians, and new / old.

--variant adds this checkout once more, run with more flags; `{otlp}` in them is the URL of
an OTLP/HTTP sink started for the run (bench/otlp_sink.py), e.g.
`--variant trace100="--otlp-endpoint {otlp} --trace-sampling 1"`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BILAYER, ROOT, free_port, haproxy, nginx, service, wait_port, workdir, wrk
from l7 import HAPROXY_HTTP
from otlp_sink import sink

ROUTE = """---
apiVersion: bilayer.dev/v1alpha1
kind: L7Route
metadata: {{name: r, namespace: bench}}
spec:
  port: {port}
  hostnames: [h.example.com]
  rules: [{{backendRefs: [{{name: nginx, port: 80}}]}}]
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--old", required=True, help="the other checkout (a git worktree, say)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--close", action="store_true", help="Connection: close instead of keep-alive")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar='NAME="FLAGS"',
        help="this checkout again with more bilayer flags ({otlp}: an OTLP/HTTP sink's URL)",
    )
    args = parser.parse_args()
    variants = [v.partition("=")[::2] for v in args.variant]
    directory = workdir()
    headers = ["Host: h.example.com", *(["Connection: close"] if args.close else [])]
    with contextlib.ExitStack() as stack:
        nginx_port = stack.enter_context(nginx(directory))
        ports = {"haproxy": free_port()}
        stack.enter_context(
            haproxy(
                directory,
                HAPROXY_HTTP.format(port=ports["haproxy"], nginx=nginx_port, threads=1),
                [ports["haproxy"]],
            )
        )
        otlp = stack.enter_context(sink()) if any("{otlp}" in f for _, f in variants) else ""
        runs = [("old", Path(args.old).resolve(), ""), ("new", ROOT, "")]
        runs += [(name, ROOT, flags) for name, flags in variants]
        for name, tree, flags in runs:
            port = ports[name] = free_port()
            folder = directory / name
            folder.mkdir()
            (folder / "objects.yaml").write_text(service("nginx", 80, nginx_port) + ROUTE.format(port=port))
            command = [str(BILAYER), "run", "-f", str(folder), "--address", "127.0.0.1"]
            command += ["--admin-port", str(free_port()), "--no-access-log", "--log-level", "warning"]
            command += flags.replace("{otlp}", otlp).split()
            env = {**os.environ, "PYTHONPATH": f"{tree}/operator:{tree}"}
            process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            stack.callback(process.terminate)
            wait_port(port, 60)
        results: dict[str, list[float]] = {name: [] for name in ports}
        for port in ports.values():  # warm up
            wrk(f"http://127.0.0.1:{port}/api/x", seconds=2, headers=headers)
        for round_index in range(args.rounds):
            order = list(ports) if round_index % 2 == 0 else list(reversed(ports))
            for name in order:
                url = f"http://127.0.0.1:{ports[name]}/api/x"
                result = wrk(url, connections=args.connections, seconds=args.seconds, headers=headers)
                results[name].append(result.requests_per_second)
                print(
                    f"round {round_index + 1} {name:8} {result.requests_per_second:>9,.0f} req/s", flush=True
                )
    base = statistics.median(results["haproxy"])
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:8} median {median:>9,.0f} req/s  {median / base:.2f}x HAProxy")
    for name, _ in variants:
        print(f"{name} / new: {statistics.median(results[name]) / statistics.median(results['new']):.3f}")
    print(f"new / old: {statistics.median(results['new']) / statistics.median(results['old']):.3f}")


if __name__ == "__main__":
    main()
