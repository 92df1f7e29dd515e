"""Worker processes (dataplane.workers), as real processes on real sockets: the count,
one table for every worker, and the faults: a worker killed under load, a table change,
SIGTERM, the saved table at start, a worker that falls behind a push."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dataplane.workers import _cgroup_quota, merge_families, parse_workers, usable_cpus

from .helpers import BilayerRun, compile_yaml, free_port, service, wait_for
from .test_run import write
from .workerkit import Backend, DataplaneProcess, all_serving, connect_spread, routes, serving_pid, workers


@pytest.fixture
def backend() -> Iterator[Backend]:
    server = Backend()
    yield server
    server.stop()


def test_auto_is_the_cgroup_quota_rounded_up_else_the_affinity(tmp_path: Path) -> None:
    membership = tmp_path / "cgroup"
    membership.write_text("0::/kubepods/pod1/container\n")
    root = tmp_path / "fs"
    (root / "kubepods/pod1/container").mkdir(parents=True)
    (root / "kubepods/pod1/cpu.max").write_text("250000 100000\n")  # the pod: 2.5 CPUs
    (root / "kubepods/pod1/container/cpu.max").write_text("max 100000\n")
    assert _cgroup_quota(membership, root) == 2.5
    (root / "kubepods/cpu.max").write_text("150000 100000\n")  # a tighter level above
    assert _cgroup_quota(membership, root) == 1.5
    for level in ("kubepods", "kubepods/pod1"):
        (root / level / "cpu.max").write_text("max 100000\n")
    assert _cgroup_quota(membership, root) is None
    assert usable_cpus() <= len(os.sched_getaffinity(0))
    assert parse_workers("auto") == usable_cpus()
    assert parse_workers("3") == 3
    for bad in ("0", "-1", "two"):
        with pytest.raises(ValueError, match="--workers"):
            parse_workers(bad)


def test_metrics_sum_over_workers_and_up_is_the_worst() -> None:
    def family(name: str, kind: str, value: float) -> dict[str, object]:
        samples = [[name + ("_total" if kind == "counter" else ""), {"port": "80"}, value]]
        return {"name": name, "help": "h", "type": kind, "samples": samples}

    merged = merge_families(
        [
            [family("bilayer_l7_requests", "counter", 3), family("bilayer_listener_up", "gauge", 1)],
            [family("bilayer_l7_requests", "counter", 4), family("bilayer_listener_up", "gauge", 0)],
        ]
    )
    values = {m.name: m.samples[0].value for m in merged}
    assert values == {"bilayer_l7_requests": 7, "bilayer_listener_up": 0}


def _hammer(conn: http.client.HTTPConnection, stop: threading.Event, tally: dict[str, int]) -> None:
    """Requests one after another on conn until stop; counts ok and failed."""
    while not stop.is_set():
        try:
            conn.request("GET", "/")
            response = conn.getresponse()
            response.read()
            tally["ok" if response.status == 200 else "failed"] += 1
        except (OSError, http.client.HTTPException):
            tally["failed"] += 1
            return  # this connection is gone


def test_a_killed_worker_is_restarted_and_the_others_connections_never_fail(
    tmp_path: Path, backend: Backend
) -> None:
    l7, l4 = free_port(), free_port()
    write(tmp_path / "routes.yaml", routes(backend.port, l7, l4))
    run = BilayerRun(str(tmp_path), "--workers", "2")
    try:
        wait_for(lambda: all_serving(run.get("/v1/table")[1], 2), what="both workers serving")
        before = workers(run.get("/v1/table")[1])
        victim, survivor = before[0]["pid"], before[1]["pid"]
        held = connect_spread(l7, [victim, survivor], each=4)
        stop = threading.Event()
        tallies = {pid: [{"ok": 0, "failed": 0} for _ in conns] for pid, conns in held.items()}
        threads = [
            threading.Thread(target=_hammer, args=(conn, stop, tally))
            for pid, conns in held.items()
            for conn, tally in zip(conns, tallies[pid], strict=True)
        ]
        for thread in threads:
            thread.start()
        try:
            wait_for(
                lambda: all(t["ok"] >= 5 for ts in tallies.values() for t in ts),
                what="load on every connection",
            )
            os.kill(victim, signal.SIGKILL)
            wait_for(
                lambda: (
                    (w := workers(run.get("/v1/table")[1]).get(0)) and w["pid"] != victim and w["serving"]
                ),
                timeout=30,
                what="worker 0 started again",
            )
            after = [t["ok"] for t in tallies[survivor]]
            wait_for(
                lambda: all(t["ok"] >= seen + 20 for t, seen in zip(tallies[survivor], after, strict=True)),
                what="the survivor's connections to keep serving",
            )
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=20)
        assert [t["failed"] for t in tallies[survivor]] == [0] * len(tallies[survivor])
        assert all(t["failed"] == 1 for t in tallies[victim]), "the killed worker's connections ended"
        for _ in range(10):  # new connections reach a serving worker
            conn = http.client.HTTPConnection("127.0.0.1", l7, timeout=10)
            conn.request("GET", "/")
            assert conn.getresponse().status == 200
            conn.close()
        metrics = run.get("/metrics")[1]
        assert "bilayer_worker_restarts_total 1.0" in metrics
        assert "bilayer_workers 2.0" in metrics
    finally:
        assert run.stop() == 0, run.output()


def _ask(conn: http.client.HTTPConnection) -> str | None:
    conn.request("GET", "/")
    response = conn.getresponse()
    response.read()
    assert response.status == 200
    return response.getheader("x-served-by")


def test_a_table_change_keeps_every_workers_connections(tmp_path: Path, backend: Backend) -> None:
    l7, l4 = free_port(), free_port()
    write(tmp_path / "routes.yaml", routes(backend.port, l7, l4, header="v1"))
    run = BilayerRun(str(tmp_path), "--workers", "2")
    try:
        wait_for(lambda: all_serving(run.get("/v1/table")[1], 2), what="both workers serving")
        pids = [w["pid"] for w in workers(run.get("/v1/table")[1]).values()]
        on_l7 = [c for conns in connect_spread(l7, pids, each=2).values() for c in conns]
        on_l4 = [c for conns in connect_spread(l4, pids, each=2).values() for c in conns]
        assert {_ask(c) for c in on_l7} == {"v1"}
        version = run.get("/v1/table")[1]["version"]
        write(tmp_path / "routes.yaml", routes(backend.port, l7, l4, header="v2"))
        wait_for(
            lambda: (s := run.get("/v1/table")[1])["version"] != version and all_serving(s, 2),
            what="the new table in every worker",
        )
        # The same connections: established ones survive, and take the new rule at once.
        assert [_ask(c) for c in on_l7] == ["v2"] * len(on_l7)
        assert [_ask(c) for c in on_l4] == [None] * len(on_l4)
        assert [w["pid"] for w in workers(run.get("/v1/table")[1]).values()] == pids
        # An open L4 tunnel is drained for --drain-grace (30 s) at SIGTERM: the test is done
        # with its connections, so it ends them rather than wait for the grace.
        for conn in on_l7 + on_l4:
            conn.close()
    finally:
        assert run.stop() == 0, run.output()


def test_sigterm_drains_every_worker(tmp_path: Path, backend: Backend) -> None:
    l7, l4 = free_port(), free_port()
    write(tmp_path / "routes.yaml", routes(backend.port, l7, l4))
    run = BilayerRun(str(tmp_path), "--workers", "2")
    wait_for(lambda: all_serving(run.get("/v1/table")[1], 2), what="both workers serving")
    pids = [w["pid"] for w in workers(run.get("/v1/table")[1]).values()]
    conns = [c for group in connect_spread(l7, pids, each=2).values() for c in group]
    statuses: list[int] = []

    def slow(conn: http.client.HTTPConnection) -> None:
        conn.request("GET", "/slow/1500")
        statuses.append(conn.getresponse().status)

    arrived = backend.arrived
    threads = [threading.Thread(target=slow, args=(c,)) for c in conns]
    for thread in threads:
        thread.start()
    wait_for(lambda: backend.arrived >= arrived + len(conns), what="every slow request at the backend")
    run.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(timeout=20)
    assert statuses == [200] * len(conns), run.output()
    assert run.process.wait(timeout=40) == 0, run.output()
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_the_saved_table_serves_every_worker_at_start(tmp_path: Path, backend: Backend) -> None:
    l7, l4 = free_port(), free_port()
    table = compile_yaml(routes(backend.port, l7, l4), generation=7).table.stamped(7)
    state = tmp_path / "state"
    state.mkdir()
    (state / "table.json").write_text(table.to_json())
    dataplane = DataplaneProcess("--workers", "2", state_dir=state)
    try:
        wait_for(lambda: dataplane.request("GET", "/readyz")[0] == 200, what="ready")
        summary = dataplane.wait_workers(2)
        assert summary["version"] == table.version  # no push: from disk
        assert all_serving(summary, 2)
        assert dataplane.request("GET", "/readyz")[0] == 200
        pids = [w["pid"] for w in workers(summary).values()]
        for conns in connect_spread(l7, pids, each=2).values():
            assert [_ask(c) for c in conns] == ["v1", "v1"]
    finally:
        assert dataplane.stop() == 0, dataplane.output()


def test_a_worker_that_falls_behind_fails_the_push_and_the_pod_keeps_its_version(
    tmp_path: Path, backend: Backend
) -> None:
    l7, l4 = free_port(), free_port()
    first = compile_yaml(routes(backend.port, l7, l4, header="v1"), generation=1).table.stamped(1)
    second = compile_yaml(routes(backend.port, l7, l4, header="v2"), generation=2).table.stamped(2)
    dataplane = DataplaneProcess("--workers", "2", "--worker-apply-timeout", "2")
    try:
        dataplane.wait_workers(2)
        status, answer = dataplane.request("PUT", "/v1/table", first.to_json().encode())
        assert (status, answer["version"]) == (200, first.version)
        lagging = workers(dataplane.request("GET", "/v1/table")[1])[1]["pid"]
        os.kill(lagging, signal.SIGSTOP)
        status, answer = dataplane.request("PUT", "/v1/table", second.to_json().encode())
        assert status == 503, answer
        assert "worker 1" in answer["error"]
        assert answer["version"] == first.version
        summary = dataplane.request("GET", "/v1/table")[1]
        assert (summary["version"], summary["generation"]) == (first.version, 1)
        # The supervisor restarts the worker that fell behind, from the version it claims.
        wait_for(
            lambda: (
                all_serving(s := dataplane.request("GET", "/v1/table")[1], 2)
                and workers(s)[1]["pid"] != lagging
            ),
            timeout=30,
            what="worker 1 started again",
        )
        status, answer = dataplane.request("PUT", "/v1/table", second.to_json().encode())
        assert (status, answer["version"]) == (200, second.version)
        summary = dataplane.request("GET", "/v1/table")[1]
        assert all_serving(summary, 2) and summary["version"] == second.version
    finally:
        assert dataplane.stop() == 0, dataplane.output()


WRITER = """
import logging, sys
from dataplane import logs
from dataplane.logs import fields
logs.setup("info")
log = logging.getLogger("bilayer.access")
writer = int(sys.argv[1])
for i in range(400):
    log.info("request", extra=fields(writer=writer, i=i, url="/" + "x" * (i * 97 % 12000)))
"""


def test_log_lines_from_many_processes_never_interleave() -> None:
    read, write_end = os.pipe()
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(n)], stderr=write_end, stdout=subprocess.DEVNULL)
        for n in range(6)
    ]
    os.close(write_end)
    with os.fdopen(read, "rb") as pipe:
        lines = pipe.read().splitlines()
    for writer in writers:
        assert writer.wait(timeout=60) == 0
    entries = [json.loads(line) for line in lines]  # a torn line would not parse
    assert sorted((e["writer"], e["i"]) for e in entries) == [(w, i) for w in range(6) for i in range(400)]
    assert all(len(line) < 4096 for line in lines)
    assert any(e.get("truncated") for e in entries)


LIMITED = """
apiVersion: bilayer.dev/v1alpha1
kind: L7Route
metadata: {{name: limited, namespace: demo}}
spec:
  port: {port}
  rules:
  - rateLimit: {{requests: 1, unit: Hour, burst: 12, key: ClientIP}}
    backendRefs: [{{name: web, port: 80}}]
"""


def test_a_rate_limit_counts_for_the_pod_whichever_worker_serves(tmp_path: Path, backend: Backend) -> None:
    l7, l4, limited = free_port(), free_port(), free_port()
    write(tmp_path / "routes.yaml", routes(backend.port, l7, l4) + "---" + LIMITED.format(port=limited))
    run = BilayerRun(str(tmp_path), "--workers", "2")
    try:
        wait_for(lambda: all_serving(run.get("/v1/table")[1], 2), what="both workers serving")
        pids = [w["pid"] for w in workers(run.get("/v1/table")[1]).values()]
        statuses: dict[int, list[int]] = {pid: [] for pid in pids}
        for _ in range(200):  # a new connection each time: the kernel picks the worker
            if all(len(s) >= 12 for s in statuses.values()):
                break
            conn = http.client.HTTPConnection("127.0.0.1", limited, timeout=10)
            conn.request("GET", "/")
            response = conn.getresponse()
            response.read()
            pid = serving_pid(conn.sock.getsockname()[1], limited, pids)
            assert pid is not None
            statuses[pid].append(response.status)
            conn.close()
        assert all(len(s) >= 12 for s in statuses.values()), "both workers served requests"
        served = [code for codes in statuses.values() for code in codes]
        # The burst of 12 is the pod's: 12 answers in all, not 12 per worker.
        assert served.count(200) == 12, statuses
        assert set(served) == {200, 429}
    finally:
        assert run.stop() == 0, run.output()


LIMITED_L4 = """
apiVersion: bilayer.dev/v1alpha1
kind: L4Listener
metadata: {{name: limited, namespace: demo}}
spec:
  port: {port}
  backendRefs: [{{name: web, port: 80}}]
  limits: {limits}
"""


def _through_l4(port: int, pids: list[int]) -> int | None:
    """One request on a new connection to port: the pid of the worker that forwarded it,
    or None when the connection was refused (reset right after accept)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = sock.recv(65536)
        except ConnectionResetError:
            return None
        if not answer:
            return None
        assert answer.startswith(b"HTTP/1.0 200") or answer.startswith(b"HTTP/1.1 200"), answer[:80]
        return serving_pid(sock.getsockname()[1], port, pids)


@pytest.mark.parametrize(
    "limits",
    [
        "{perClient: {connectionRate: {connections: 1, unit: Hour, burst: 12}}}",
        "{acceptRate: {connections: 1, unit: Hour, burst: 12}}",
    ],
    ids=["per-client-rate", "accept-rate"],
)
def test_l4_connection_rates_count_for_the_pod(tmp_path: Path, backend: Backend, limits: str) -> None:
    l7, l4, limited = free_port(), free_port(), free_port()
    write(
        tmp_path / "routes.yaml",
        routes(backend.port, l7, l4) + "---" + LIMITED_L4.format(port=limited, limits=limits),
    )
    run = BilayerRun(str(tmp_path), "--workers", "2")
    try:
        wait_for(lambda: all_serving(run.get("/v1/table")[1], 2), what="both workers serving")
        pids = [w["pid"] for w in workers(run.get("/v1/table")[1]).values()]
        # 60 connections one after the other: the kernel hands each worker about 30, so
        # buckets per worker would admit 24; the pod's bucket admits its burst of 12.
        outcomes = [_through_l4(limited, pids) for _ in range(60)]
        admitted = [pid for pid in outcomes if pid is not None]
        assert len(admitted) == 12, outcomes
        assert set(admitted) == set(pids), f"both workers admitted connections: {outcomes}"
    finally:
        assert run.stop() == 0, run.output()


CHECKED = """
apiVersion: bilayer.dev/v1alpha1
kind: L4Listener
metadata: {{name: checked, namespace: demo}}
spec:
  port: {port}
  backendRefs: [{{name: pair, port: 80}}]
  loadBalancing: {{policy: RoundRobin}}
  healthCheck: {{interval: 200ms, timeout: 100ms, unhealthyThreshold: 1, healthyThreshold: 1}}
"""


def _log(run: BilayerRun) -> list[dict[str, object]]:
    return [json.loads(line) for line in run.output().splitlines() if line.startswith("{")]


def _connect_failures(run: BilayerRun, endpoint: str) -> float:
    for line in run.get("/metrics")[1].splitlines():
        if line.startswith(f'bilayer_endpoint_connect_failures_total{{endpoint="{endpoint}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_health_checks_run_once_per_pod_and_every_worker_follows_the_verdict(
    tmp_path: Path, backend: Backend
) -> None:
    l7, l4, checked, dead = free_port(), free_port(), free_port(), free_port()
    pair = service("pair", 80, [("127.0.0.1", backend.port), ("127.0.0.1", dead)], namespace="demo")
    write(
        tmp_path / "routes.yaml",
        routes(backend.port, l7, l4) + "---\n" + pair + "---" + CHECKED.format(port=checked),
    )
    run = BilayerRun(str(tmp_path), "--workers", "2")
    try:
        told = "endpoint health from the supervisor"
        wait_for(
            lambda: (
                {e.get("worker") for e in _log(run) if e["msg"] == told and e["healthy"] is False} == {0, 1}
            ),
            what="both workers told the dead endpoint is down",
        )
        verdicts = [e for e in _log(run) if e["msg"] in ("endpoint unhealthy", "endpoint healthy")]
        assert verdicts and all("worker" not in e for e in verdicts), "checks run in the supervisor only"
        failures = _connect_failures(run, f"127.0.0.1:{dead}")
        pids = [w["pid"] for w in workers(run.get("/v1/table")[1]).values()]
        connect_spread(checked, pids, each=3)  # every one answered by the live endpoint
        # Round robin over the two: a worker that had not heard the verdict would try the
        # dead endpoint for about every other connection.
        assert _connect_failures(run, f"127.0.0.1:{dead}") == failures
    finally:
        assert run.stop() == 0, run.output()


def test_a_worker_that_dies_mid_push_fails_it_and_the_others_go_back_to_the_claimed_table(
    tmp_path: Path, backend: Backend
) -> None:
    l7, l4 = free_port(), free_port()
    first = compile_yaml(routes(backend.port, l7, l4, header="v1"), generation=1).table.stamped(1)
    second = compile_yaml(routes(backend.port, l7, l4, header="v2"), generation=2).table.stamped(2)
    dataplane = DataplaneProcess("--workers", "2")
    try:
        dataplane.wait_workers(2)
        assert dataplane.request("PUT", "/v1/table", first.to_json().encode())[0] == 200
        pids = workers(dataplane.request("GET", "/v1/table")[1])
        survivor, dying = pids[0]["pid"], pids[1]["pid"]
        on_survivor = connect_spread(l7, [survivor, dying], each=1)[survivor][0]
        os.kill(dying, signal.SIGSTOP)  # it cannot answer: the push waits for it
        answers: list[tuple[int, Any]] = []
        push = threading.Thread(
            target=lambda: answers.append(dataplane.request("PUT", "/v1/table", second.to_json().encode()))
        )
        push.start()

        def survivor_applied() -> bool:
            lines = [json.loads(line) for line in dataplane.output().splitlines() if line.startswith("{")]
            return any(
                e["msg"] == "table applied" and e.get("worker") == 0 and e["version"] == second.version
                for e in lines
            )

        wait_for(survivor_applied, what="worker 0 serving the pushed table")
        assert _ask(on_survivor) == "v2"
        os.kill(dying, signal.SIGKILL)
        push.join(timeout=30)
        status, answer = answers[0]
        assert status == 503 and "worker 1" in answer["error"], answer
        assert answer["version"] == first.version
        # Worker 0 is put back on the claimed table (the same process, its connection kept),
        # worker 1 starts again from it: the pod never claims what one of them lacks.
        summary = dataplane.wait_workers(2)
        assert summary["version"] == first.version
        assert workers(summary)[0]["pid"] == survivor
        assert _ask(on_survivor) == "v1"
    finally:
        assert dataplane.stop() == 0, dataplane.output()


ECHO_SERVICE = """
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: demo}}
spec:
  ports: [{{name: main, port: 80, protocol: UDP, targetPort: main}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: echo-0, namespace: demo, labels: {{kubernetes.io/service-name: echo}}}}
addressType: IPv4
ports: [{{name: main, port: {port}, protocol: UDP}}]
endpoints:
- addresses: [127.0.0.1]
"""

UDP = """
apiVersion: bilayer.dev/v1alpha1
kind: L4Listener
metadata: {{name: echo, namespace: demo}}
spec:
  port: {port}
  protocol: UDP
  backendRefs: [{{name: echo, port: 80}}]
"""


def test_shared_sockets_serve_tcp_from_every_worker_and_udp_binds_in_each(
    tmp_path: Path, backend: Backend
) -> None:
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    stop = threading.Event()

    def answer() -> None:
        echo.settimeout(0.2)
        while not stop.is_set():
            try:
                data, peer = echo.recvfrom(2048)
            except TimeoutError:
                continue
            echo.sendto(data, peer)

    responder = threading.Thread(target=answer)
    responder.start()
    l7, l4, udp = free_port(), free_port(), free_port()
    udp_service = ECHO_SERVICE.format(port=echo.getsockname()[1])
    text = routes(backend.port, l7, l4) + "---\n" + udp_service + "---" + UDP.format(port=udp)
    write(tmp_path / "routes.yaml", text)
    run = BilayerRun(str(tmp_path), "--workers", "2", "--worker-sockets", "shared")
    try:
        wait_for(lambda: all_serving(run.get("/v1/table")[1], 2), what="both workers serving")
        summary = run.get("/v1/table")[1]
        assert {p: v["state"] for p, v in summary["listeners"].items()} == {
            str(l7): "serving",
            str(l4): "serving",
            str(udp): "serving",
        }, summary
        pids = [w["pid"] for w in workers(summary).values()]
        for conns in connect_spread(l7, pids, each=2).values():  # one socket, both workers accept
            assert [_ask(c) for c in conns] == ["v1", "v1"]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            client.sendto(b"ping", ("127.0.0.1", udp))
            assert client.recvfrom(2048)[0] == b"ping"
    finally:
        stop.set()
        responder.join()
        echo.close()
        assert run.stop() == 0, run.output()


PAIR_ROUTE = """
apiVersion: bilayer.dev/v1alpha1
kind: L7Route
metadata: {{name: pair, namespace: demo}}
spec:
  port: {port}
  rules: [{{backendRefs: [{{name: pair, port: 80}}]}}]
"""


def test_an_ejection_by_one_worker_reaches_the_others(tmp_path: Path, backend: Backend) -> None:
    l7, l4, paired, dead = free_port(), free_port(), free_port(), free_port()
    pair = service("pair", 80, [("127.0.0.1", backend.port), ("127.0.0.1", dead)], namespace="demo")
    text = routes(backend.port, l7, l4) + "---\n" + pair + "---" + PAIR_ROUTE.format(port=paired)
    write(tmp_path / "routes.yaml", text)
    run = BilayerRun(str(tmp_path), "--workers", "2")
    try:
        wait_for(lambda: all_serving(run.get("/v1/table")[1], 2), what="both workers serving")
        pids = {w["pid"]: i for i, w in workers(run.get("/v1/table")[1]).items()}

        def ejected_by() -> set[object]:
            return {e.get("worker") for e in _log(run) if e["msg"] == "endpoint ejected"}

        def load_one_worker() -> int | None:
            """Requests on one connection (so on one worker) until that worker ejects."""
            conn = http.client.HTTPConnection("127.0.0.1", paired, timeout=10)
            try:
                conn.connect()
                pid = serving_pid(conn.sock.getsockname()[1], paired, list(pids))
                for _ in range(50):
                    conn.request("GET", "/")
                    conn.getresponse().read()
                    if ejected_by():
                        return pid
            except (OSError, http.client.HTTPException):
                return None  # the connection ended: take another
            finally:
                conn.close()
            return None

        loaded = wait_for(load_one_worker, what="one worker ejecting the dead endpoint")
        ejecting = pids[loaded]
        assert ejected_by() == {ejecting}, "only the loaded worker saw the failures"
        other = 1 - ejecting
        wait_for(
            lambda: any(
                e["msg"] == "endpoint ejected by another worker" and e.get("worker") == other
                for e in _log(run)
            ),
            what="the other worker told of the ejection",
        )
    finally:
        assert run.stop() == 0, run.output()
