"""Worker processes: how connections reach them, and what a push costs with them.

    .venv/bin/python bench/workers.py [--seconds 10] [--connections 64] [--routes 10000]

1. Spread and cost. `bilayer run --workers 2` with each --worker-sockets mode (reuseport:
   a socket per worker, the kernel hashes connections; shared: one socket the supervisor
   binds and hands over), and `--workers 1` for reference, in front of nginx (one worker).
   wrk keep-alive, one thread, against an L7 route and an L4 listener. Reported: req/s,
   the proxy's CPU per request (utime + stime of the supervisor and every worker, from
   /proc, over the run), the connections each worker holds in the middle of the run, and
   each worker's share of the CPU (with keep-alive, a connection stays where it landed).
   A second wrk run with `Connection: close` shows how new connections spread.
2. Fan-out. `bilayer dataplane --workers N` for N = 1, 2: the time of PUT /v1/table of a
   table with --routes L7Routes (the supervisor validates it, sends it to each worker, each
   parses and applies it, then the answer), and of a PATCH changing one route.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(Path(__file__).resolve().parent), str(ROOT), str(ROOT / "operator")]

from common import BILAYER, free_port, nginx, process, service, wait_port, workdir, wrk  # noqa: E402

from dataplane.table import Table  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def manifests(nginx_port: int, l7: int, l4: int) -> str:
    return (
        service("nginx", 80, nginx_port)
        + f"""apiVersion: bilayer.dev/v1alpha1
kind: L7Route
metadata: {{name: web, namespace: bench}}
spec:
  port: {l7}
  rules: [{{backendRefs: [{{name: nginx, port: 80}}]}}]
---
apiVersion: bilayer.dev/v1alpha1
kind: L4Listener
metadata: {{name: raw, namespace: bench}}
spec:
  port: {l4}
  backendRefs: [{{name: nginx, port: 80}}]
"""
    )


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return sorted(found)


def held_connections(pid: int, port: int) -> int:
    """Established connections to port whose proxy end pid holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if int(parts[1].split(":")[1], 16) == port and parts[3] == "01" and parts[9] in inodes:
            count += 1
    return count


@contextlib.contextmanager
def bilayer(directory: Path, text: str, ports: list[int], *extra: str) -> Iterator[int]:
    folder = directory / f"objects-{free_port()}"
    folder.mkdir()
    (folder / "bench.yaml").write_text(text)
    admin = free_port()
    args = [str(BILAYER), "run", "-f", str(folder), "--address", "127.0.0.1", "--admin-port", str(admin)]
    with process([*args, "--no-access-log", "--log-level", "warning", *extra], admin) as proc:
        for port in ports:
            wait_port(port, timeout=120)
        yield proc.pid


def measure(pid: int, url: str, port: int, args: argparse.Namespace, *, close: bool) -> dict[str, object]:
    pids = [pid, *children(pid)]
    workers = pids[1:] or [pid]
    before = {p: cpu_seconds(p) for p in pids}
    spread: list[int] = []
    seconds = args.seconds

    def sample() -> None:
        time.sleep(seconds / 2)  # the middle of the run
        spread.extend(held_connections(p, port) for p in workers)

    sampler = threading.Thread(target=sample)
    sampler.start()
    result = wrk(
        url, connections=args.connections, seconds=seconds, headers=["Connection: close"] if close else None
    )
    sampler.join()
    used = {p: cpu_seconds(p) - before[p] for p in pids}
    requests = result.requests_per_second * seconds
    worker_cpu = [used[p] for p in workers]
    return {
        "rps": round(result.requests_per_second),
        "cpu_us_per_request": round(sum(used.values()) / requests * 1e6, 1),
        "connections_per_worker": spread,
        "cpu_share_per_worker": [round(c / (sum(worker_cpu) or 1), 2) for c in worker_cpu],
    }


def spread_and_cost(args: argparse.Namespace, directory: Path) -> list[dict[str, object]]:
    rows = []
    with nginx(directory) as nginx_port:
        for label, extra in [
            ("1 worker", ["--workers", "1"]),
            ("2 workers, reuseport", ["--workers", "2", "--worker-sockets", "reuseport"]),
            ("2 workers, shared", ["--workers", "2", "--worker-sockets", "shared"]),
        ]:
            l7, l4 = free_port(), free_port()
            with bilayer(directory, manifests(nginx_port, l7, l4), [l7, l4], *extra) as pid:
                time.sleep(1)  # let the workers settle after start (imports, first table)
                for target, port in [("L7", l7), ("L4", l4)]:
                    for close in (False, True):
                        if close and target == "L4":
                            continue  # an L4 connection per request measures the backend's accept
                        found = measure(pid, f"http://127.0.0.1:{port}/", port, args, close=close)
                        row = {
                            "setup": label,
                            "target": target,
                            "client": "close" if close else "keep-alive",
                            **found,
                        }
                        print(json.dumps(row), flush=True)
                        rows.append(row)
    return rows


def big_tables(count: int) -> tuple[Table, Table]:
    """Two tables of count L7Routes on one port, one route's path apart."""
    import yaml

    from controlplane.compiler import Snapshot, compile_snapshot

    backing = [d for d in yaml.safe_load_all(service("web", 80, 8080)) if d]

    def route(i: int, prefix: str) -> dict[str, object]:
        spec = {
            "port": 18080,
            "hostnames": [f"h{i}.example.com"],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": prefix}}],
                    "backendRefs": [{"name": "web", "port": 80}],
                },
                {"backendRefs": [{"name": "web", "port": 80}]},
            ],
        }
        meta = {"name": f"r{i}", "namespace": "bench"}
        return {"apiVersion": "bilayer.dev/v1alpha1", "kind": "L7Route", "metadata": meta, "spec": spec}

    routes = [route(i, "/api") for i in range(count)]
    first = compile_snapshot(Snapshot.of([*backing, *routes]), 1).table
    routes[count // 2] = route(count // 2, "/api/v2")
    second = compile_snapshot(Snapshot.of([*backing, *routes]), 2).table
    return first, second


def push(admin: int, times: dict[str, list[float]], kind: str, method: str, body: bytes) -> None:
    """One push to the admin API, timed into times[kind]."""
    started = time.perf_counter()
    request = urllib.request.Request(f"http://127.0.0.1:{admin}/v1/table", data=body, method=method)
    with urllib.request.urlopen(request, timeout=600) as response:
        assert response.status == 200, response.read()
    times[kind].append(time.perf_counter() - started)


def wait_serving(admin: int, count: int) -> None:
    """Until the dataplane's count workers are up (the admin API answers before)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/v1/table", timeout=10) as response:
            found = json.loads(response.read()).get("workers")
        if found is None or (len(found) == count and all(w["serving"] for w in found)):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{count} workers did not start")


def fan_out(args: argparse.Namespace) -> list[dict[str, object]]:
    from dataplane import delta

    a, b = big_tables(args.routes)
    rows = []
    for count in (1, 2):
        admin = free_port()
        argv = [str(BILAYER), "dataplane", "--address", "127.0.0.1", "--admin-address", "127.0.0.1"]
        argv += [
            "--admin-port",
            str(admin),
            "--metrics-port",
            "0",
            "--workers",
            str(count),
            "--log-level",
            "warning",
        ]
        with process(argv, admin):
            wait_serving(admin, count)
            times: dict[str, list[float]] = {"first put": [], "put": [], "patch": []}

            push(admin, times, "first put", "PUT", a.stamped(1).to_json().encode())
            for round_ in range(args.rounds):
                base, generation = a.stamped(1 + 2 * round_), 2 + 2 * round_
                push(admin, times, "patch", "PATCH", delta.diff(base, b.stamped(generation)).to_json())
                push(admin, times, "put", "PUT", a.stamped(generation + 1).to_json().encode())  # back to a
            row = {
                "workers": count,
                "routes": args.routes,
                "table_mb": round(len(a.to_json()) / 1e6, 1),
                "first_put_seconds": round(times["first put"][0], 3),
                "put_seconds": round(statistics.median(times["put"]), 3),
                "patch_seconds": round(statistics.median(times["patch"]), 4),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--routes", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["spread", "fanout"])
    args = parser.parse_args()
    directory = workdir()
    if args.only != "fanout":
        spread_and_cost(args, directory)
    if args.only != "spread":
        fan_out(args)


if __name__ == "__main__":
    main()
