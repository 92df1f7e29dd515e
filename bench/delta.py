"""Delta benchmark: what a dataplane spends applying a one-route delta to a large table.

    .venv/bin/python bench/delta.py [--routes 10000] [--runs 31]

Compiles a table of N L7Routes on one port (one host each), then a second table with one
route's path changed, and times, over --runs runs, what ``Dataplane.apply_delta`` does before
the swap: parsing the delta document (``delta.parse``) and patching the served table
(``delta.patch``: checks, version sum), with the heap frozen as a dataplane freezes it.
Prints, in milliseconds, the median, quartiles and fastest run of the thread's CPU time
(what other processes on a shared machine disturb least) and of the wall time. In process,
no sockets: it measures the code, not the network.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "operator")]

from controlplane.compiler import Snapshot, compile_snapshot  # noqa: E402
from dataplane import delta  # noqa: E402


def route(i: int, path: str = "/") -> dict[str, Any]:
    return {
        "apiVersion": "bilayer.dev/v1alpha1",
        "kind": "L7Route",
        "metadata": {"name": f"r{i}", "namespace": "bench", "generation": 1},
        "spec": {
            "port": 8080,
            "hostnames": [f"h{i}.example.com"],
            "rules": [{"matches": [{"path": {"value": path}}], "backendRefs": [{"name": "web", "port": 80}]}],
        },
    }


def references() -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "bench"},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8000}]},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "web-1",
                "namespace": "bench",
                "labels": {"kubernetes.io/service-name": "web"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8000}],
            "endpoints": [{"addresses": ["127.0.0.1"]}],
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=31)
    args = parser.parse_args()
    objects = references() + [route(i) for i in range(args.routes)]
    base = compile_snapshot(Snapshot.of(objects), 1).table
    changed = copy.deepcopy(objects)
    changed[2 + args.routes // 2] = route(args.routes // 2, "/v2")
    target = compile_snapshot(Snapshot.of(changed), 2).table
    body = delta.diff(base, target).to_json()
    # As a dataplane does after loading a table (eventloop.freeze_heap): the collector
    # does not walk the table's objects again.
    gc.collect()
    gc.freeze()
    wall, cpu = [], []
    for _ in range(args.runs):
        start, start_cpu = time.perf_counter(), time.thread_time()
        result = delta.patch(base, delta.parse(body))
        cpu.append(time.thread_time() - start_cpu)
        wall.append(time.perf_counter() - start)
    assert result.version == target.version
    print(f"one-route delta ({len(body)} bytes) on {args.routes} routes, {args.runs} runs:")
    for name, seconds in (("CPU time", cpu), ("wall time", wall)):
        q1, median, q3 = statistics.quantiles(seconds, n=4)
        print(
            f"  {name}: median {median * 1000:.3f} ms (quartiles {q1 * 1000:.3f} / {q3 * 1000:.3f}, "
            f"fastest {min(seconds) * 1000:.3f})"
        )


if __name__ == "__main__":
    main()
