"""Helpers shared by tests: free ports, polling with a deadline, compiling YAML text."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import yaml

from controlplane.compiler import Compiled, Snapshot, compile_snapshot

T = TypeVar("T")


_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port nobody listens on now, and not one this process handed out before: the
    kernel may offer the same free port twice in a row, and a test that asked for two ports
    then got one port twice."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> T:
    """Poll predicate until it returns something truthy; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


async def async_wait_for(
    predicate: Callable[[], Awaitable[T] | T],
    deadline_s: float = 10.0,
    interval: float = 0.02,
    what: str = "",
) -> T:
    """wait_for for coroutines: predicate may be sync or async."""
    deadline = time.monotonic() + deadline_s
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {deadline_s}s waiting for {what or predicate}")
        await asyncio.sleep(interval)


def compile_yaml(text: str, generation: int = 1) -> Compiled:
    return compile_snapshot(Snapshot.of(load_yaml(text)), generation)


def load_yaml(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def service(name: str, port: int, endpoints: list[tuple[str, int]], namespace: str = "default") -> str:
    """YAML for a Service and one EndpointSlice per endpoint port, so that endpoints on
    loopback can each have their own port (the slices share the port name "main")."""
    docs = [
        f"""apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  ports: [{{name: main, port: {port}, targetPort: main}}]
"""
    ]
    for i, (address, target) in enumerate(endpoints):
        docs.append(
            f"""apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-{i}, namespace: {namespace}, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{name: main, port: {target}}}]
endpoints:
- addresses: [{address}]
"""
        )
    return "---\n".join(docs)


class BilayerRun:
    """`bilayer run -f DIR` as a real subprocess, with its admin API on a free port."""

    def __init__(self, directory: str, *extra: str, fixed_admin_port: int | None = None) -> None:
        import os
        import subprocess
        import sys
        import tempfile
        from pathlib import Path

        # The checkout's code, as in the tests' own process (pytest's pythonpath): the venv's
        # editable install may point at another checkout (a worktree's tests ran main's code).
        root = Path(__file__).resolve().parent.parent
        path = os.pathsep.join([str(root / "operator"), str(root), os.environ.get("PYTHONPATH", "")])
        self.admin_port = fixed_admin_port or free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="bilayer-run-", suffix=".log", delete=False)  # noqa: SIM115
        bilayer = Path(sys.executable).with_name("bilayer")
        self.process = subprocess.Popen(
            [
                str(bilayer),
                "run",
                "-f",
                directory,
                "--address",
                "127.0.0.1",
                "--admin-port",
                str(self.admin_port),
                *extra,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": path.rstrip(os.pathsep)},
        )
        wait_for(self._ready, timeout=20, what="bilayer run to load its table")

    def get(self, path: str) -> tuple[int, Any]:
        import json
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as response:
                body = response.read().decode()
                return response.status, json.loads(body) if path.startswith("/v1/") else body
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()
        except OSError:
            return 0, None

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"bilayer run exited: {self.output()}")
        return self.get("/readyz")[0] == 200

    def status(self) -> dict[str, Any]:
        code, answer = self.get("/v1/status")
        assert code == 200 and isinstance(answer, dict), f"/v1/status answered {code}: {answer!r}"
        return answer

    def conditions(self, kind: str, name: str) -> dict[str, dict[str, Any]]:
        for obj in self.status()["objects"]:
            if obj["kind"] == kind and obj["name"] == name:
                return {c["type"]: c for c in obj["conditions"]}
        return {}

    def output(self) -> str:
        with open(self.log.name) as f:
            return f.read()

    def stop(self) -> int:
        self.process.terminate()
        try:
            return self.process.wait(timeout=40)
        except Exception:
            self.process.kill()
            raise
