"""Worker-process tests' kit: a threaded HTTP/1.1 backend, routes on two ports (L7 and L4)
to it, a `bilayer dataplane` process, and finding which worker holds a connection."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .helpers import free_port, service, wait_for


class Backend:
    """A threaded HTTP/1.1 keep-alive server: / answers at once, /slow/MS after MS
    milliseconds; it counts the requests that have arrived."""

    def __init__(self) -> None:
        self.arrived = 0
        self._lock = threading.Lock()
        kit = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                with kit._lock:
                    kit.arrived += 1
                if self.path.startswith("/slow/"):
                    time.sleep(int(self.path.rsplit("/", 1)[1]) / 1000)  # the backend's own work
                body = b"ok\n"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def routes(backend_port: int, l7_port: int, l4_port: int, header: str = "v1") -> str:
    """An L7Route on l7_port (with an x-served-by response header) and an L4Listener on
    l4_port, both to the backend."""
    return (
        service("web", 80, [("127.0.0.1", backend_port)], namespace="demo")
        + f"""---
apiVersion: bilayer.dev/v1alpha1
kind: L7Route
metadata: {{name: web, namespace: demo}}
spec:
  port: {l7_port}
  rules:
  - filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier: {{set: [{{name: x-served-by, value: {header}}}]}}
    backendRefs: [{{name: web, port: 80}}]
---
apiVersion: bilayer.dev/v1alpha1
kind: L4Listener
metadata: {{name: raw, namespace: demo}}
spec:
  port: {l4_port}
  backendRefs: [{{name: web, port: 80}}]
"""
    )


class DataplaneProcess:
    """`bilayer dataplane --workers N` on loopback (no token), admin API on a free port."""

    def __init__(self, *extra: str, state_dir: Path | None = None) -> None:
        self.admin_port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="bilayer-dataplane-", suffix=".log", delete=False)  # noqa: SIM115
        bilayer = Path(sys.executable).with_name("bilayer")
        state = ["--state-dir", str(state_dir)] if state_dir is not None else []
        self.process = subprocess.Popen(
            [
                str(bilayer),
                "dataplane",
                "--address",
                "127.0.0.1",
                "--admin-address",
                "127.0.0.1",
                "--admin-port",
                str(self.admin_port),
                "--metrics-port",
                "0",
                *state,
                *extra,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._up, timeout=30, what="the dataplane's admin API")

    def wait_workers(self, count: int) -> dict[str, Any]:
        """GET /v1/table once count workers are up (and serve the claimed table, if any)."""

        def up() -> dict[str, Any] | None:
            summary = self.request("GET", "/v1/table")[1]
            found = workers(summary or {})
            ready = len(found) == count and all(w["serving"] for w in found.values())
            return (
                summary if ready and all(w["version"] == summary["version"] for w in found.values()) else None
            )

        return wait_for(up, timeout=60, what=f"{count} workers serving")

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"bilayer dataplane exited: {self.output()}")
        return self.request("GET", "/healthz")[0] == 200

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.admin_port}{path}", data=body, method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                text = response.read().decode()
                return response.status, json.loads(text) if path.startswith("/v1/") else text
        except urllib.error.HTTPError as err:
            text = err.read().decode()
            return err.code, json.loads(text) if path.startswith("/v1/") else text
        except OSError:
            return 0, None

    def output(self) -> str:
        return Path(self.log.name).read_text()

    def stop(self) -> int:
        self.process.terminate()
        try:
            return self.process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


def workers(summary: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """GET /v1/table's workers by index."""
    return {w["index"]: w for w in summary.get("workers", [])}


def all_serving(summary: dict[str, Any], count: int) -> bool:
    """Every one of count workers serves the version the pod claims."""
    found = workers(summary)
    return len(found) == count and all(
        w["serving"] and w["version"] == summary["version"] for w in found.values()
    )


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    with_fds = f"/proc/{pid}/fd"
    for fd in os.listdir(with_fds):
        try:
            target = os.readlink(f"{with_fds}/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def serving_pid(client_port: int, proxy_port: int, pids: list[int]) -> int | None:
    """The process holding the proxy's end of the connection from client_port (on
    127.0.0.1) to proxy_port, from /proc/net/tcp and the processes' descriptors."""
    inode = None
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            parts = line.split()
            local, remote = parts[1], parts[2]
            if int(local.split(":")[1], 16) == proxy_port and int(remote.split(":")[1], 16) == client_port:
                inode = parts[9]
    if inode is None:
        return None
    return next((pid for pid in pids if inode in _socket_inodes(pid)), None)


def connect_spread(
    port: int, pids: list[int], each: int, most: int = 200
) -> dict[int, list[http.client.HTTPConnection]]:
    """Keep-alive connections to port until every worker in pids holds at least each of them
    (the kernel picks the worker); one request on each makes the connection accepted."""
    held: dict[int, list[http.client.HTTPConnection]] = {pid: [] for pid in pids}
    spare = []
    for _ in range(most):
        if all(len(conns) >= each for conns in held.values()):
            break
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/")
        response = conn.getresponse()
        response.read()
        assert response.status == 200
        pid = serving_pid(conn.sock.getsockname()[1], port, pids)
        assert pid is not None, "no worker holds the connection"
        (held[pid] if len(held[pid]) < each else spare).append(conn)
    for conn in spare:
        conn.close()
    assert all(len(conns) >= each for conns in held.values()), {p: len(c) for p, c in held.items()}
    return held
