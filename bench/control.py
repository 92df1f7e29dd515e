"""Control-plane benchmark: the operator at 10,000 L7Routes and 1,000 L4Listeners.

    .venv/bin/python bench/control.py [--routes 10000] [--listeners 1000] [--changes 200]

kmock's emulator (with the subclass from tests/) holds the objects, in a process of its
own so that the measuring client does not slow the API server down; `bilayer operator`
runs as its own process (its RSS is measured); three `bilayer dataplane` processes on
127.0.0.2-4 play the pods. Measured: initial sync (list, compile, push, all pods
serving); the time until every object's status is written (11,000 status patches, each
coming back as a watch event); compile time and table size (from the operator's log);
operator RSS; the propagation latency of new routes, from creation to a pod answering
for the new host, while a background task keeps changing other routes (after five
warm-up routes, not measured); and the status writes a rolling update of the dataplane
pods causes (each replaced by a new pod, one at a time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "operator")]

import kmock  # noqa: E402

from tests.kube_emulator import Emulator  # noqa: E402
from tests.operator_kit import TOKEN, DataplanePod  # noqa: E402

NAMESPACE = "bilayer-system"
HTTP_PORT = 18080
L4_BASE = 20000
L7_PATH = "/apis/bilayer.dev/v1alpha1/namespaces/bench/l7routes"
WARMUP = 5


def stamp(obj: dict[str, Any], version: int) -> dict[str, Any]:
    meta = obj["metadata"]
    meta.update(
        uid=f"uid-{version}",
        resourceVersion=str(version),
        generation=1,
        creationTimestamp="2026-01-01T00:00:00Z",
    )
    return obj


def route(i: int, host: str | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "bilayer.dev/v1alpha1",
        "kind": "L7Route",
        "metadata": {"name": f"r{i}", "namespace": "bench"},
        "spec": {
            "port": HTTP_PORT,
            "hostnames": [host or f"h{i}.example.com"],
            "rules": [{"matches": [{"path": {"value": "/"}}], "backendRefs": [{"name": "web", "port": 80}]}],
        },
    }


def listener(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "bilayer.dev/v1alpha1",
        "kind": "L4Listener",
        "metadata": {"name": f"l{i}", "namespace": "bench"},
        "spec": {"port": L4_BASE + i, "backendRefs": [{"name": "web", "port": 80}]},
    }


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# --- the API server, in its own process ---


def serve_api(
    args: argparse.Namespace, backend_port: int, pods: list[dict[str, Any]], pipe: Connection
) -> None:
    asyncio.run(_serve_api(args, backend_port, pods, pipe))


async def _serve_api(
    args: argparse.Namespace, backend_port: int, pods: list[dict[str, Any]], pipe: Connection
) -> None:
    async with Emulator() as emulator, kmock.Server(emulator) as server:
        version = 1000
        l7, l4 = "bilayer.dev/v1alpha1/l7routes", "bilayer.dev/v1alpha1/l4listeners"
        for i in range(args.routes):
            version += 1
            emulator.objects[l7, "bench", f"r{i}"] = stamp(route(i), version)
        for i in range(args.listeners):
            version += 1
            emulator.objects[l4, "bench", f"l{i}"] = stamp(listener(i), version)
        emulator.objects["v1/services", "bench", "web"] = stamp(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "web", "namespace": "bench"},
                "spec": {"ports": [{"name": "http", "port": 80, "targetPort": backend_port}]},
            },
            version + 1,
        )
        emulator.objects["discovery.k8s.io/v1/endpointslices", "bench", "web-1"] = stamp(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": "web-1",
                    "namespace": "bench",
                    "labels": {"kubernetes.io/service-name": "web"},
                },
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": backend_port}],
                "endpoints": [{"addresses": ["127.0.0.1"]}],
            },
            version + 2,
        )
        emulator.objects["v1/services", NAMESPACE, "bilayer-dataplane"] = stamp(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "bilayer-dataplane", "namespace": NAMESPACE},
                "spec": {"ports": [{"name": "http-80", "port": 80, "targetPort": 80}]},
            },
            version + 3,
        )
        emulator._version = version + 10
        for body in pods:
            body["metadata"]["resourceVersion"] = str(emulator._next())
            emulator.objects["v1/pods", NAMESPACE, body["metadata"]["name"]] = body
        pipe.send(str(server.url).rstrip("/"))
        # Until told to stop, answer "count" with the status writes the API server saw.
        while await asyncio.get_running_loop().run_in_executor(None, pipe.recv) == "count":
            pipe.send(emulator.status_writes)


# --- the measurement ---


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--routes", type=int, default=10000)
    parser.add_argument("--listeners", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--pods", type=int, default=3)
    args = parser.parse_args()

    app = web.Application()
    app.router.add_get("/{tail:.*}", lambda request: web.Response(text="ok"))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    backend = web.TCPSite(runner, "127.0.0.1", 0)
    await backend.start()
    backend_port = backend._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    os.environ["BILAYER_ADMIN_TOKEN"] = TOKEN
    pods = [DataplanePod(i) for i in range(args.pods)]
    for pod in pods:
        await asyncio.to_thread(pod.start)
    ours, theirs = multiprocessing.Pipe()
    api = multiprocessing.Process(
        target=serve_api, args=(args, backend_port, [pod.body() for pod in pods], theirs), daemon=True
    )
    api.start()
    url = await asyncio.to_thread(ours.recv)

    def status_writes() -> int:
        ours.send("count")
        count: int = ours.recv()
        return count

    try:
        await measure(args, url, pods, status_writes)
    finally:
        ours.send("stop")
        api.join(timeout=10)
        for pod in pods:
            await asyncio.to_thread(pod.stop)
        await runner.cleanup()


async def measure(
    args: argparse.Namespace, url: str, pods: list[DataplanePod], status_writes: Callable[[], int]
) -> None:
    kubeconfig = Path(tempfile.mkdtemp()) / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "e",
                "clusters": [{"name": "e", "cluster": {"server": url}}],
                "users": [{"name": "e", "user": {"token": "x"}}],
                "contexts": [{"name": "e", "context": {"cluster": "e", "user": "e"}}],
            }
        )
    )
    log_path = Path(tempfile.mkdtemp()) / "operator.log"
    bilayer = Path(sys.executable).with_name("bilayer")
    started = time.monotonic()
    operator = await asyncio.create_subprocess_exec(
        str(bilayer),
        "operator",
        f"--namespace={NAMESPACE}",
        "--no-leader-election",
        "--admin-port=9911",
        "--health-port=0",
        env={**os.environ, "KUBECONFIG": str(kubeconfig), "BILAYER_ADMIN_TOKEN": TOKEN},
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
    )
    total = args.routes + args.listeners
    async with aiohttp.ClientSession() as client, aiohttp.ClientSession(base_url=url) as api:

        async def serves(pod: DataplanePod, host: str) -> bool:
            try:
                async with client.get(
                    f"http://{pod.address}:{HTTP_PORT}/",
                    headers={"Host": host},
                    timeout=aiohttp.ClientTimeout(total=2),
                ) as response:
                    return response.status == 200
            except (aiohttp.ClientError, TimeoutError):
                return False

        last = f"h{args.routes - 1}.example.com"
        while not all([await serves(pod, last) for pod in pods]):
            await asyncio.sleep(0.05)
            if operator.returncode is not None:
                raise SystemExit(log_path.read_text()[-3000:])
        sync_seconds = time.monotonic() - started
        print(f"initial sync: {sync_seconds:.1f} s to list, compile and serve on all pods", flush=True)
        rss_sync = rss_mb(operator.pid)

        async def programmed() -> int:
            count = 0
            for kind in ("l7routes", "l4listeners"):
                async with api.get(f"/apis/bilayer.dev/v1alpha1/namespaces/bench/{kind}") as response:
                    for item in (await response.json())["items"]:
                        conditions = (item.get("status") or {}).get("conditions") or []
                        count += any(c["type"] == "Programmed" and c["status"] == "True" for c in conditions)
            return count

        while (done := await programmed()) < total:
            await asyncio.sleep(1.0)
            if time.monotonic() - started > 600:
                raise SystemExit(f"only {done} of {total} statuses written after 600 s")
        status_seconds = time.monotonic() - started
        print(f"statuses: all {total} Programmed after {status_seconds:.1f} s", flush=True)
        # Warm-up, not measured: the watch events of those 11,000 status writes come back
        # after the writes and the operator works through them for a few seconds; a few
        # routes created one after another wait for that.
        for n in range(WARMUP):
            host = f"warmup{n}.example.com"
            await api.post(L7_PATH, json=route(args.routes + args.changes + n, host))
            while not await serves(pods[0], host):  # noqa: ASYNC110 - polling a pod over HTTP
                await asyncio.sleep(0.05)

        churning = True

        async def churn() -> None:
            i = 0
            while churning:  # relabel an existing route every 50 ms
                await api.patch(
                    f"{L7_PATH}/r{i % args.routes}",
                    json={"spec": {"hostnames": [f"h{i % args.routes}.example.com", f"c{i}.example.com"]}},
                    headers={"Content-Type": "application/merge-patch+json"},
                )
                i += 1
                await asyncio.sleep(0.05)

        churner = asyncio.create_task(churn())
        latencies: list[float] = []
        timeline: list[tuple[float, int, float]] = []  # (created at, n, latency)

        async def change(n: int) -> None:
            host = f"new{n}.example.com"
            created = time.monotonic()
            await api.post(L7_PATH, json=route(args.routes + n, host))
            while not await serves(pods[n % len(pods)], host):  # noqa: ASYNC110 - polling a pod over HTTP
                await asyncio.sleep(0.005)
            latencies.append(time.monotonic() - created)
            timeline.append((created - started, n, time.monotonic() - created))

        changes = []
        for n in range(args.changes):  # a new route every 100 ms, each timed on its own
            changes.append(asyncio.create_task(change(n)))
            await asyncio.sleep(0.1)
        await asyncio.gather(*changes)
        churning = False
        await churner
        rss_end = rss_mb(operator.pid)
        rollout_writes = await rollout(api, pods, serves, status_writes, f"new{args.changes - 1}.example.com")

    operator.terminate()
    await operator.wait()
    timings = {
        "sync": sync_seconds,
        "status": status_seconds,
        "rss_sync": rss_sync,
        "rss_end": rss_end,
        "rollout_writes": rollout_writes,
    }
    report(args, log_path.read_text(), timings, latencies)
    slowest = sorted(timeline, key=lambda item: -item[2])[:5]
    print()
    print("slowest: " + ", ".join(f"#{n} at {at:.1f} s: {took * 1000:.0f} ms" for at, n, took in slowest))


async def rollout(
    api: aiohttp.ClientSession,
    pods: list[DataplanePod],
    serves: Any,
    status_writes: Callable[[], int],
    host: str,
) -> int:
    """A rolling update of the dataplane (maxSurge 1, maxUnavailable 0): for each pod, a
    new one starts and is served the table, then the old one goes, each step once the
    operator's status writes have stopped. Returns the status
    writes the API server saw meanwhile, counted once 20 s pass without one (a pass of
    11,000 writes takes longer than that, but not without writing)."""

    async def quiet(seconds: float) -> int:
        """The count of status writes once none has come for `seconds`."""
        settled, last, deadline = (
            time.monotonic(),
            await asyncio.to_thread(status_writes),
            time.monotonic() + 900,
        )
        while time.monotonic() - settled < seconds and time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            if (now := await asyncio.to_thread(status_writes)) != last:
                settled, last = time.monotonic(), now
        return last

    # The churn before this left status writes in the rate limiter's queue: let them end.
    mark = await quiet(5.0)
    index = len(pods)
    for old in list(pods):
        pod = DataplanePod(index)
        index += 1
        await asyncio.to_thread(pod.start)
        pods.append(pod)  # stopped with the others at the end
        async with api.post(f"/api/v1/namespaces/{NAMESPACE}/pods", json=pod.body()) as response:
            assert response.status < 300, await response.text()
        while not await serves(pod, host):  # noqa: ASYNC110 - the whole table takes seconds
            await asyncio.sleep(0.1)
        # Kubernetes takes seconds between steps (readiness, preStop, draining): let the
        # operator's status passes see each step, as they would.
        await quiet(5.0)
        async with api.delete(f"/api/v1/namespaces/{NAMESPACE}/pods/{old.name}") as response:
            assert response.status < 300, await response.text()
        await asyncio.to_thread(old.stop)
        await quiet(5.0)

    last = await quiet(20.0) - mark
    print(f"rollout of {len(pods) // 2} pods: {last} status writes", flush=True)
    return last


def report(args: argparse.Namespace, log: str, timings: dict[str, float], latencies: list[float]) -> None:
    sync_seconds, status_seconds = timings["sync"], timings["status"]
    rss_sync, rss_end = timings["rss_sync"], timings["rss_end"]
    compiles = [float(m) for m in re.findall(r'"msg": "compiled a new table".*?"seconds": ([\d.]+)', log)]
    warm = [float(m) for m in re.findall(r'"msg": "compiled everything.*?"seconds": ([\d.]+)', log)]
    pushed = re.findall(
        r'"msg": "table pushed".*?"method": "(\w+)", "bytes": (\d+), "seconds": ([\d.]+)', log
    )
    latencies.sort()
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print()
    scale = f"{args.routes} L7Routes + {args.listeners} L4Listeners, {args.pods} dataplanes"
    print(f"### Control plane, {scale}")
    print()
    print("| measurement | value |")
    print("|---|---:|")
    print(f"| initial sync (list, compile, push, all pods serving) | {sync_seconds:.1f} s |")
    print(f"| every object's status written (Programmed) | {status_seconds:.1f} s |")
    if warm:
        print(f"| compile of everything (at start, before the first table) | {warm[0]:.2f} s |")
    if compiles:
        print(f"| compile of the first table | {compiles[0] * 1000:.1f} ms |")
    if len(compiles) > 1:
        churned = sorted(compiles[1:])
        p99_compile = churned[min(len(churned) - 1, int(0.99 * len(churned)))]
        print(
            f"| compile under churn, median / p99 of {len(churned)} | "
            f"{statistics.median(churned) * 1000:.1f} ms / {p99_compile * 1000:.1f} ms |"
        )
    for method, what in (("PUT", "whole table"), ("PATCH", "delta")):
        sizes = [int(b) for m, b, _ in pushed if m == method]
        seconds = [float(s) for m, _, s in pushed if m == method]
        if sizes:
            print(
                f"| push of the {what} ({method}) to one pod, median size / time, {len(sizes)} pushes | "
                f"{statistics.median(sizes) / 1000:.1f} kB / {statistics.median(seconds) * 1000:.0f} ms |"
            )
    print(f"| operator RSS after sync / at end | {rss_sync:.0f} MB / {rss_end:.0f} MB |")
    spread = f"{p50 * 1000:.0f} ms / {p99 * 1000:.0f} ms"
    print(f"| propagation p50 / p99 over {len(latencies)} new routes | {spread} |")
    rollout = timings["rollout_writes"]
    print(f"| status writes during a rolling update of the {args.pods} dataplanes | {rollout:.0f} |")


if __name__ == "__main__":
    asyncio.run(main())
