"""examples/grpc: its YAML compiles to gRPC routes over h2c clusters (what `bilayer run -f
examples/grpc` serves), and its backend and client scripts talk gRPC to each other."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from controlplane.compiler import Compiled, compile_snapshot
from controlplane.explain import explain
from controlplane.files import FileSource

from .helpers import free_port

EXAMPLE = Path(__file__).parent.parent / "examples" / "grpc"


def _compiled() -> Compiled:
    source = FileSource(EXAMPLE)
    source.reload()
    assert source.problems == []
    return compile_snapshot(source.snapshot())


def test_the_example_compiles_to_grpc_routes_over_h2c() -> None:
    compiled = _compiled()
    table = compiled.table
    for key, conditions in compiled.statuses.items():
        assert [(c.type, c.status) for c in conditions] == [("Accepted", "True"), ("ResolvedRefs", "True")], (
            key
        )
    assert {name: c.protocol for name, c in table.clusters.items()} == {
        "demo/greeter-a:50051": "h2",
        "demo/greeter-b:50051": "h2",
    }
    l7 = table.listeners[8090].l7
    assert l7 is not None and l7.http2
    say_hello = explain(table, "localhost", "/helloworld.Greeter/SayHello", method="POST")
    assert (say_hello.rule_name, say_hello.backends[0]["backend"]) == ("say-hello", "demo/greeter-a:50051")
    other = explain(table, "localhost", "/helloworld.Greeter/SayHelloStream", method="POST")
    assert (other.rule_name, other.backends[0]["backend"]) == ("greeter", "demo/greeter-b:50051")
    retry = l7.rules["demo/greeter/0"].retry
    assert retry is not None and retry.grpcCodes == [14]


def test_the_example_backend_answers_the_example_client() -> None:
    pytest.importorskip("grpc", reason="grpcio (PyPI) runs the example's backend and client")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(EXAMPLE / "server.py"), "--name", "a", "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        # It prints once it listens (a blocking read: the line comes or the process died).
        assert "on 127.0.0.1" in server.stdout.readline()
        client = subprocess.run(
            [sys.executable, str(EXAMPLE / "client.py"), f"127.0.0.1:{port}", "--name", "test"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert client.stdout.splitlines() == [
            "hello test, from backend a",
            *(f"hello test #{n}, from backend a" for n in (1, 2, 3)),
        ]
    finally:
        server.terminate()
        server.wait(10)
