"""End to end on a kind cluster: build the image, helm install, apply examples/cluster/, send traffic.

Needs Docker (a running engine), kind, kubectl and helm. Where any is missing, the test
is skipped and says what is missing. Runs unchanged in CI (.github/workflows/e2e.yml).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# `make install` puts helm beside the virtualenv's python.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
CLUSTER = os.environ.get("BILAYER_E2E_CLUSTER", "bilayer-e2e")
NAMESPACE = "bilayer-system"
IMAGE = "bilayer:e2e"


def missing_tools() -> list[str]:
    missing = [tool for tool in ("docker", "kind", "kubectl", "helm") if shutil.which(tool) is None]
    if "docker" not in missing:
        engine = subprocess.run(["docker", "info"], capture_output=True, check=False)
        if engine.returncode != 0:
            missing.append("a running Docker engine")
    return missing


pytestmark = [
    pytest.mark.skipif(bool(missing_tools()), reason=f"e2e needs {', '.join(missing_tools()) or 'nothing'}"),
    pytest.mark.timeout(1800),
]


def sh(*args: str, check: bool = True, timeout: float = 600) -> str:
    result = subprocess.run(args, capture_output=True, text=True, check=False, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def kubectl(*args: str, check: bool = True) -> str:
    return sh("kubectl", "--context", f"kind-{CLUSTER}", *args, check=check)


def eventually(check: object, timeout: float = 180, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()  # type: ignore[operator]
            if result:
                return result
        except (AssertionError, OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(2)


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    if CLUSTER not in sh("kind", "get", "clusters", check=False).split():
        sh("kind", "create", "cluster", "--name", CLUSTER, "--wait", "120s", timeout=900)
    sh("docker", "build", "-t", IMAGE, str(ROOT), timeout=1200)
    sh("kind", "load", "docker-image", IMAGE, "--name", CLUSTER, timeout=600)
    sh(
        "helm",
        "upgrade",
        "--install",
        "bilayer",
        str(ROOT / "helm" / "bilayer"),
        "--kube-context",
        f"kind-{CLUSTER}",
        "--namespace",
        NAMESPACE,
        "--create-namespace",
        "--set",
        "image.repository=bilayer",
        "--set",
        "image.tag=e2e",
        "--set",
        "image.pullPolicy=Never",
        "--set",
        "service.type=NodePort",
        "--wait",
        "--timeout",
        "5m",
        timeout=900,
    )
    kubectl("apply", "-f", str(ROOT / "examples" / "cluster" / "namespace.yaml"))
    kubectl("apply", "-f", str(ROOT / "examples" / "cluster"))
    try:
        yield
    finally:
        if not os.environ.get("BILAYER_E2E_KEEP"):
            sh("kind", "delete", "cluster", "--name", CLUSTER, check=False)


@pytest.fixture(scope="module")
def forwarded(cluster: None) -> Iterator[dict[int, int]]:
    """Local ports forwarded to the dataplane Service's 8080 and 6379."""
    local = {8080: _free(), 6379: _free()}
    for port in local:
        eventually(
            lambda port=port: (
                str(port)
                in kubectl(
                    "-n", NAMESPACE, "get", "svc", "bilayer-dataplane", "-o", "jsonpath={.spec.ports[*].port}"
                )
            ),
            what=f"the Service to open {port}",
        )
    process = subprocess.Popen(
        [
            "kubectl",
            "--context",
            f"kind-{CLUSTER}",
            "-n",
            NAMESPACE,
            "port-forward",
            "svc/bilayer-dataplane",
            *(f"{mine}:{theirs}" for theirs, mine in local.items()),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        eventually(lambda: _open(local[8080]), what="port-forward")
        yield local
    finally:
        process.terminate()


def _free() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def http(port: int, path: str, headers: dict[str, str] | None = None) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.read().decode().strip()


def conditions(kind: str, name: str) -> dict[str, str]:
    obj = json.loads(kubectl("-n", "demo", "get", kind, name, "-o", "json"))
    return {c["type"]: c["status"] for c in obj.get("status", {}).get("conditions", [])}


def test_resources_are_programmed(cluster: None) -> None:
    for kind, name in (("l7route", "echo"), ("l4listener", "redis")):
        eventually(
            lambda kind=kind, name=name: conditions(kind, name).get("Programmed") == "True",
            what=f"{kind} {name} Programmed",
        )
        assert conditions(kind, name)["Accepted"] == "True"
    table = kubectl("get", "l4l,l7r", "-A")
    assert "PROGRAMMED" in table.upper()


def test_http_routing_through_the_ingress(forwarded: dict[int, int]) -> None:
    port = forwarded[8080]
    assert eventually(lambda: http(port, "/") == "echo v1", what="echo v1")
    assert http(port, "/", {"x-canary": "true"}) == "echo v2"
    assert http(port, "/v1/anything") == "echo v1"


def test_redis_through_the_ingress(forwarded: dict[int, int]) -> None:
    with socket.create_connection(("127.0.0.1", forwarded[6379]), timeout=5) as conn:
        conn.sendall(b"PING\r\nSET k v\r\nGET k\r\n")
        answer = b""
        while answer.count(b"\r\n") < 4:
            answer += conn.recv(100)
    assert answer == b"+PONG\r\n+OK\r\n$1\r\nv\r\n"


def test_delete_and_reapply(cluster: None) -> None:
    kubectl("-n", "demo", "delete", "l7route", "echo")
    eventually(
        lambda: (
            "8080"
            not in kubectl(
                "-n", NAMESPACE, "get", "svc", "bilayer-dataplane", "-o", "jsonpath={.spec.ports[*].port}"
            )
        ),
        what="port 8080 to leave the Service",
    )
    kubectl("apply", "-f", str(ROOT / "examples" / "cluster" / "routes.yaml"))
    eventually(lambda: conditions("l7route", "echo").get("Programmed") == "True", what="re-applied route")
