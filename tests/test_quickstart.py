"""The README's quick start, as written: the same folder, ports and requests."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import BilayerRun, wait_for

ROOT = Path(__file__).parent.parent
QUICKSTART = ROOT / "examples" / "quickstart"


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def fetch(url: str) -> tuple[int, dict[str, str], str]:
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(url, timeout=5) as response:
            return (
                response.status,
                {k.lower(): v for k, v in response.headers.items()},
                response.read().decode(),
            )
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read().decode()


@pytest.fixture(scope="module")
def quickstart() -> Iterator[BilayerRun]:
    backend = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            "8081",
            "--bind",
            "127.0.0.1",
            "--directory",
            str(QUICKSTART / "site"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run = BilayerRun(str(QUICKSTART), fixed_admin_port=9901)
    try:
        yield run
    finally:
        run.stop()
        backend.terminate()
        backend.wait(10)


def test_http_through_the_l7_route(quickstart: BilayerRun) -> None:
    status, headers, body = wait_for(lambda: fetch("http://localhost:8080/") if _up(8080) else None)
    assert status == 200 and "Hello from the backend" in body
    assert headers["x-served-by"] == "bilayer"


def test_redirect_rule(quickstart: BilayerRun) -> None:
    status, headers, _ = fetch("http://localhost:8080/old")
    assert status == 301 and headers["location"] == "http://localhost:8080/"


def test_tcp_through_the_l4_listener(quickstart: BilayerRun) -> None:
    status, _, body = wait_for(lambda: fetch("http://localhost:8082/") if _up(8082) else None)
    assert status == 200 and "Hello from the backend" in body


def test_status_shows_every_object_programmed(quickstart: BilayerRun) -> None:
    objects = quickstart.status()["objects"]
    assert {o["name"] for o in objects} == {"web", "web-tcp"}
    for obj in objects:
        assert all(c["status"] == "True" for c in obj["conditions"]), obj


def _up(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True
