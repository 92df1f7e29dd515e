"""`bilayer run -f DIR` as a process: status, live reload, bad input kept out."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import BilayerRun, wait_for

ROOT = Path(__file__).parent.parent

EXTRA = """
apiVersion: bilayer.dev/v1alpha1
kind: L7Route
metadata: {name: extra, namespace: demo}
spec:
  port: 18090
  hostnames: [extra.example.com]
  rules: [{backendRefs: [{name: web, port: 80}]}]
"""


def write(path: Path, text: str) -> None:
    path.write_text(text)
    st = path.stat()  # some filesystems keep whole-second mtimes: make the change visible
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "examples/quickstart/backend.yaml", tmp_path)
    return tmp_path


@pytest.fixture
def run(folder: Path) -> Iterator[BilayerRun]:
    process = BilayerRun(str(folder))
    yield process
    assert process.stop() == 0, process.output()


def test_status_lists_objects_and_logs_are_json(folder: Path, run: BilayerRun) -> None:
    write(folder / "extra.yaml", EXTRA)
    conditions = wait_for(lambda: run.conditions("L7Route", "extra"), what="the new route in /v1/status")
    assert conditions["Accepted"]["status"] == "True"
    wait_for(lambda: run.get("/v1/table")[1]["listeners"].get("18090"), what="listener 18090 in the table")
    for line in run.output().splitlines():
        entry = json.loads(line)
        assert {"time", "level", "logger", "msg"} <= set(entry)


def test_reload_invalid_object_reported_and_others_kept(folder: Path, run: BilayerRun) -> None:
    write(folder / "extra.yaml", EXTRA)
    wait_for(lambda: run.conditions("L7Route", "extra"), what="extra route")
    version = run.get("/v1/table")[1]["version"]
    write(folder / "bad.yaml", EXTRA.replace("name: extra", "name: bad").replace("18090", "99999"))
    bad = wait_for(lambda: run.conditions("L7Route", "bad"), what="the invalid route's conditions")
    assert bad["Accepted"]["reason"] == "Invalid"
    assert "spec.port" in bad["Accepted"]["message"]
    assert bad["Programmed"]["status"] == "False"
    assert run.get("/v1/table")[1]["version"] == version  # nothing else changed
    assert run.conditions("L7Route", "extra")["Accepted"]["status"] == "True"
    assert '"L7Route demo/bad: Invalid: spec.port' in run.output()


def test_broken_yaml_keeps_serving_the_last_good_content(folder: Path, run: BilayerRun) -> None:
    write(folder / "extra.yaml", EXTRA)
    wait_for(lambda: run.conditions("L7Route", "extra"), what="extra route")
    write(folder / "extra.yaml", EXTRA + "\n  oops: [unclosed\n")
    wait_for(lambda: run.status()["problems"], what="the YAML problem to be reported")
    assert "extra.yaml: not valid YAML" in run.status()["problems"][0]
    assert run.conditions("L7Route", "extra")["Accepted"]["status"] == "True"
    (folder / "extra.yaml").unlink()
    wait_for(lambda: not run.conditions("L7Route", "extra"), what="the route to go with its file")
    assert run.status()["problems"] == []


def test_an_emptied_file_takes_its_routes_away_once_it_stays_empty(folder: Path, run: BilayerRun) -> None:
    """Believed after a second (a save shows the file empty for a moment): the folder is
    looked at again though nothing changes any more."""
    write(folder / "extra.yaml", EXTRA)
    wait_for(lambda: run.conditions("L7Route", "extra"), what="extra route")
    write(folder / "extra.yaml", "")
    wait_for(lambda: not run.conditions("L7Route", "extra"), what="the route to go with its content")
    assert run.status()["problems"] == []


def test_a_typo_keeps_the_last_valid_version_served(folder: Path, run: BilayerRun) -> None:
    write(folder / "extra.yaml", EXTRA)
    wait_for(lambda: run.get("/v1/table")[1]["listeners"].get("18090"), what="listener 18090")
    write(folder / "extra.yaml", EXTRA.replace("hostnames:", "hostname:"))
    accepted = wait_for(
        lambda: (
            (run.conditions("L7Route", "extra").get("Accepted") or {}).get("reason") == "Invalid"
            and run.conditions("L7Route", "extra")["Accepted"]
        ),
        what="the typo reported",
    )
    assert "spec.hostname: unknown field" in accepted["message"]
    assert accepted["message"].endswith("the last valid version is still served")
    assert run.conditions("L7Route", "extra")["Programmed"]["status"] == "True"
    assert run.get("/v1/table")[1]["listeners"].get("18090")  # still served
    (folder / "extra.yaml").unlink()
    wait_for(lambda: not run.get("/v1/table")[1]["listeners"].get("18090"), what="the route to go")


@pytest.mark.parametrize(("flags", "per_rule"), [((), True), (("--no-route-metrics",), False)])
def test_route_metrics_switch(folder: Path, flags: tuple[str, ...], per_rule: bool) -> None:
    import urllib.error
    import urllib.request

    from .helpers import free_port

    port = free_port()
    write(folder / "extra.yaml", EXTRA.replace("18090", str(port)))
    process = BilayerRun(str(folder), *flags)

    def answer() -> int | None:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Host": "extra.example.com"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as err:
            return err.code  # (no backend runs on the quick start's 8081: a 503 counts too)
        except OSError:
            return None  # the listener is not bound yet

    try:
        wait_for(answer, what=f"an answer on port {port}")
        status, text = process.get("/metrics")
        assert status == 200
        assert f'port="{port}"' in text and "bilayer_l7_responses_total{" in text
        assert ("bilayer_l7_route_responses_total{" in text) is per_rule
        assert ("bilayer_l7_route_duration_seconds_bucket{" in text) is per_rule
    finally:
        assert process.stop() == 0, process.output()


def test_admin_api_off_loopback_needs_a_token(folder: Path) -> None:
    import subprocess
    import sys

    bilayer = Path(sys.executable).with_name("bilayer")
    result = subprocess.run(
        [str(bilayer), "run", "-f", str(folder), "--admin-address", "0.0.0.0", "--admin-port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "BILAYER_ADMIN_TOKEN"},
    )
    assert result.returncode != 0
    assert "needs a token" in result.stderr


def test_l4_listener_forwards_tcp(folder: Path) -> None:
    import socket
    import socketserver
    import threading

    class Echo(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            while data := self.request.recv(65536):
                self.request.sendall(data)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    from .helpers import free_port, service

    port = free_port()
    write(
        folder / "tcp.yaml",
        service("echo", 80, [("127.0.0.1", server.server_address[1])])
        + f"""---
apiVersion: bilayer.dev/v1alpha1
kind: L4Listener
metadata: {{name: echo, namespace: default}}
spec: {{port: {port}, backendRefs: [{{name: echo, port: 80}}]}}
""",
    )
    run = BilayerRun(str(folder))
    try:
        wait_for(lambda: run.conditions("L4Listener", "echo").get("Programmed", {}).get("status") == "True")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"through bilayer\n")
            assert conn.recv(100) == b"through bilayer\n"
    finally:
        assert run.stop() == 0
        server.shutdown()
