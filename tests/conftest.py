"""Shared test options and fixtures."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import subprocess

    from .l7kit import HTTPBackend


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        help="rewrite tests/golden/*.out.yaml from the compiler",
    )


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden"))


ROOT = Path(__file__).resolve().parent.parent


def compiled_sources() -> list[str]:
    """The modules setup.py compiles (compiled-modules.txt), as paths from the checkout."""
    lines = (ROOT / "compiled-modules.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _stale_extensions() -> list[str]:
    """Compiled modules older than their source: Python imports the extension module, so
    the tests would run code that is no longer there."""
    stale = []
    for path in compiled_sources():
        source = ROOT / path
        for built in source.parent.glob(source.stem + ".cpython-*.so"):
            if built.stat().st_mtime < source.stat().st_mtime:
                stale.append(path)
    return stale


def pytest_configure(config: pytest.Config) -> None:
    stale = _stale_extensions()
    if stale:
        pytest.exit(
            f"the compiled modules of {', '.join(stale)} are older than their source: "
            "`make install` rebuilds them (or BILAYER_COMPILE=0 .venv/bin/pip install -e . "
            "removes them and runs the Python source)",
            returncode=4,
        )
    config.addinivalue_line(
        "markers", "both_loops: run this async test on uvloop and on asyncio's default loop"
    )


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, object]:
    """Async tests run on uvloop, as the dataplane does; `both_loops` tests also on asyncio's."""
    import asyncio

    import uvloop

    if item.get_closest_marker("asyncio_loop") or item.get_closest_marker("looptime"):
        return {"asyncio": asyncio.new_event_loop}
    factories: dict[str, object] = {"uvloop": uvloop.new_event_loop}
    if item.get_closest_marker("both_loops"):
        factories["asyncio"] = asyncio.new_event_loop
    return factories


def _wait_port(port: int, process: object, timeout: float = 15.0) -> None:
    import socket
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if getattr(process, "poll")() is not None:  # noqa: B009
            raise RuntimeError(f"server on port {port} exited early")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


def _require(binary: str, package: str) -> str:
    import shutil

    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if shutil.which(f"/usr/sbin/{binary}") else None)
    if path is None:
        pytest.fail(
            f"{binary} is not installed: `apt-get install {package}` (.ci/run does it)", pytrace=False
        )
    return path


@pytest.fixture(scope="session")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> object:
    """A real redis-server from Debian on a free loopback port."""
    import subprocess

    from .helpers import free_port

    binary = _require("redis-server", "redis-server")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_port(port, process)
    yield port
    process.terminate()
    process.wait(10)


@pytest.fixture(scope="session")
def haproxy_proxy_parser(tmp_path_factory: pytest.TempPathFactory) -> object:
    """HAProxy (Debian) accepting PROXY v1/v2 and answering with the source it parsed."""

    from .helpers import free_port

    port = free_port()
    process = _haproxy_parser(tmp_path_factory.mktemp("haproxy"), port, "")
    yield port
    process.terminate()
    process.wait(10)


def _haproxy_parser(folder: Path, port: int, bind_options: str) -> subprocess.Popen[bytes]:
    """HAProxy accepting PROXY v1/v2 on port and answering with the source it parsed."""
    import subprocess

    binary = _require("haproxy", "haproxy")
    config = folder / "parser.cfg"
    answer = 'lf-string "%[src]:%[src_port] -> %[dst]:%[dst_port]\\n"'
    config.write_text(
        f"""global
    log stderr format raw local0 err
defaults
    mode http
    timeout client 5s
    timeout server 5s
    timeout connect 1s
frontend parser
    bind 127.0.0.1:{port} accept-proxy {bind_options}
    http-request return status 200 content-type text/plain {answer}
"""
    )
    process = subprocess.Popen(
        [binary, "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _wait_port(port, process)
    return process


@pytest.fixture
async def raw() -> object:
    """A raw HTTP backend that parses strictly and echoes what it parsed (tests/rawkit.py)."""
    from .rawkit import RawBackend

    backend = await RawBackend().start()
    yield backend
    await backend.stop()


@pytest.fixture(scope="session")
def apiserver() -> object:
    """A real etcd + kube-apiserver (RBAC on) for the whole session, with our CRDs.

    Binaries from $KUBEBUILDER_ASSETS or ../shared/envtest/bin; skipped, saying why,
    where there are none."""
    import asyncio

    from .envtest import ApiServer, assets
    from .envtest_kit import install_crds

    binaries, why = assets()
    if binaries is None:
        pytest.skip(why)
    server = ApiServer(binaries).start()
    try:
        asyncio.run(install_crds(server))
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def haproxy_tls_parser(tmp_path_factory: pytest.TempPathFactory) -> object:
    """HAProxy (Debian) accepting PROXY v1/v2, then terminating TLS for hap.example.com with
    a trustme certificate, and answering with the source it read from the PROXY header."""

    import trustme

    from .helpers import free_port

    port = free_port()
    ca = trustme.CA()
    leaf = ca.issue_cert("hap.example.com")
    folder = tmp_path_factory.mktemp("haproxy-tls")
    pem = folder / "hap.pem"
    pem.write_bytes(leaf.private_key_pem.bytes() + b"".join(c.bytes() for c in leaf.cert_chain_pems))
    process = _haproxy_parser(folder, port, f"ssl crt {pem}")
    yield port, ca
    process.terminate()
    process.wait(10)


# Two HTTP backends that echo what they received (tests/l7kit.py), for the L7 tests.
@contextlib.asynccontextmanager
async def _echo_backend(name: str) -> AsyncIterator[HTTPBackend]:
    from .l7kit import HTTPBackend

    backend = await HTTPBackend(name).start()
    try:
        yield backend
    finally:
        await backend.stop()


@pytest.fixture
async def web_a() -> AsyncIterator[HTTPBackend]:
    async with _echo_backend("a") as backend:
        yield backend


@pytest.fixture
async def web_b() -> AsyncIterator[HTTPBackend]:
    async with _echo_backend("b") as backend:
        yield backend
