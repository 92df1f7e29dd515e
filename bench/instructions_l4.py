"""Instructions per L4 round trip, counted by valgrind's callgrind: the L4 counterpart of
bench/instructions.py, steady whatever else the machine is doing.

    .venv/bin/python bench/instructions_l4.py [--tree CHECKOUT] [--requests 5000] [--warmup 20] [--keep]
        [--haproxy]

`bilayer run` (the code of CHECKOUT, this one by default) runs under callgrind with an L4
listener in front of redis-server; one client opens one connection through it and sends
PING, waits for +PONG, W + N times. The same is done with W pings only; per round trip =
(instructions with W + N - instructions with W) / N. Both runs accept and connect once, so
the figure is the cost of moving one request and one response across: two reads, two
writes, the wake-ups between them. User-space instructions only (callgrind does not see
the kernel): bench/README.md has the system calls per round trip, counted with strace.
--haproxy counts HAProxy `mode tcp` (one thread) in the same place, for comparison.
Needs valgrind and redis-server (Debian packages).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BILAYER, ROOT, callgrind_total, free_port, need, process, service, wait_port, workdir

PING = b"PING\r\n"
PONG = b"+PONG\r\n"


def l4(port: int) -> str:
    return f"""apiVersion: bilayer.dev/v1alpha1
kind: L4Listener
metadata: {{name: redis, namespace: bench}}
spec: {{port: {port}, backendRefs: [{{name: redis, port: 80}}]}}
---
"""


def round_trips(sock: socket.socket, count: int) -> None:
    for _ in range(count):
        sock.sendall(PING)
        data = b""
        while len(data) < len(PONG):
            chunk = sock.recv(64)
            assert chunk, "the proxy closed the connection"
            data += chunk
        assert data == PONG, data


HAPROXY = """global
    nbthread 1
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend redis_in
    bind 127.0.0.1:{port}
    default_backend redis
backend redis
    server r1 127.0.0.1:{redis}
"""


def proxy_command(tree: Path | None, folder: Path, port: int, redis_port: int) -> list[str]:
    """Bilayer (tree's code) or, tree None, HAProxy `mode tcp`, listening on port."""
    if tree is None:
        (folder / "haproxy.cfg").write_text(HAPROXY.format(port=port, redis=redis_port))
        return [need("haproxy", "haproxy"), "-f", str(folder / "haproxy.cfg")]
    (folder / "objects.yaml").write_text(service("redis", 80, redis_port) + l4(port))
    command = [sys.executable, str(BILAYER), "run", "-f", str(folder), "--address", "127.0.0.1"]
    return [*command, "--admin-port", str(free_port()), "--no-access-log", "--log-level", "warning"]


def count(tree: Path | None, redis_port: int, pings: int, directory: Path) -> int:
    port = free_port()
    folder = directory / f"run-{pings}"
    folder.mkdir()
    out = folder / "callgrind.out"
    command = [need("valgrind", "valgrind"), "--tool=callgrind", f"--callgrind-out-file={out}"]
    command += proxy_command(tree, folder, port, redis_port)
    env = {**os.environ, "PYTHONPATH": f"{tree}/operator:{tree}"} if tree else None
    proxy = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, 600)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            round_trips(sock, pings)
    finally:
        proxy.terminate()
        proxy.wait(600)
    return callgrind_total(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", default=str(ROOT), help="the checkout whose code runs (default: this one)")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=20, help="round trips in both runs")
    parser.add_argument("--keep", action="store_true", help="keep the callgrind outputs (path printed)")
    parser.add_argument("--haproxy", action="store_true", help="count HAProxy `mode tcp` instead")
    args = parser.parse_args()
    directory = workdir()
    tree = None if args.haproxy else Path(args.tree).resolve()
    redis_port = free_port()
    redis = [need("redis-server", "redis-server"), "--port", str(redis_port), "--save", ""]
    with process([*redis, "--appendonly", "no"], redis_port, cwd=directory):
        idle = count(tree, redis_port, args.warmup, directory)
        busy = count(tree, redis_port, args.warmup + args.requests, directory)
    if args.keep:
        print(f"callgrind outputs: {directory}/run-*/callgrind.out")
    else:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"{tree or 'haproxy'}: {(busy - idle) / args.requests:,.0f} instructions per round trip")


if __name__ == "__main__":
    main()
