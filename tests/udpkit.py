"""Building blocks for UDP tests: real DNS servers (Debian's dnsmasq) as backends,
dnspython as the client, and UDP listener tables."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
from typing import Any

import dns.asyncquery
import dns.message
import dns.rdatatype
import pytest

from dataplane.table import Table

from .helpers import wait_for
from .l4kit import objects_table, refs, services_yaml


def free_udp_port() -> int:
    """A port free on UDP and on TCP (dnsmasq serves both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port: int = udp.getsockname()[1]
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port


class Dnsmasq:
    """dnsmasq on a loopback port answering TXT whoami.test with its name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, port: int = 0) -> Dnsmasq:
        binary = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
        if not shutil.which(binary):
            pytest.fail(
                "dnsmasq is not installed: `apt-get install dnsmasq` (.ci/run does it)", pytrace=False
            )
        self.port = port or free_udp_port()
        self.process = subprocess.Popen(
            [
                binary, "--keep-in-foreground", f"--user={getpass.getuser()}", "--port", str(self.port),
                "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
                "--conf-file=/dev/null", "--pid-file", f"--txt-record=whoami.test,{self.name}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(self._answers, timeout=10, what=f"dnsmasq {self.name} to answer")
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"dnsmasq exited with {self.process.returncode}")
        try:
            return whoami_sync(self.port) == self.name
        except (OSError, dns.exception.Timeout):
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


def query() -> dns.message.Message:
    return dns.message.make_query("whoami.test", dns.rdatatype.TXT)


def name_of(response: dns.message.Message) -> str:
    return response.answer[0][0].strings[0].decode()  # type: ignore[no-any-return,attr-defined]


def whoami_sync(port: int) -> str:
    import dns.query

    return name_of(dns.query.udp(query(), "127.0.0.1", port=port, timeout=0.5))


async def whoami(port: int, source_port: int = 0, wait: float = 2.0, address: str = "127.0.0.1") -> str:
    """Ask through address:port which backend answers (dnspython checks that the reply
    comes from the address and port it asked)."""
    response = await dns.asyncquery.udp(
        query(), address, port=port, timeout=wait, source="127.0.0.1", source_port=source_port
    )
    return name_of(response)


def udp_table(port: int, backends: dict[str, list[int]], generation: int = 1, **spec: Any) -> Table:
    """One UDP L4Listener on port to Services (UDP port 80) with these endpoint ports."""
    listener = {"port": port, "protocol": "UDP", "backendRefs": refs(*backends), **spec}
    return objects_table({f"u{port}": listener}, services_yaml(backends, "UDP"), generation)
