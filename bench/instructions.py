"""Instructions per proxied HTTP request, counted by valgrind's callgrind: unlike req/s, the
count does not move with what else the machine is doing.

    .venv/bin/python bench/instructions.py [--tree CHECKOUT] [--requests 2000]

`bilayer run` (the code of CHECKOUT, this one by default) runs under callgrind in front of
nginx; one client sends N keep-alive GETs, one after the other. The same is done with no
request; per request = (instructions with N - instructions with 0) / N. About two minutes.
Needs valgrind (Debian package) and nginx.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BILAYER, ROOT, free_port, need, nginx, service, wait_port, workdir
from compare_l7 import ROUTE

REQUEST = b"GET /api/x HTTP/1.1\r\nHost: h.example.com\r\n\r\n"


def one(sock: socket.socket) -> None:
    sock.sendall(REQUEST)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
    assert match is not None, head
    while len(body) < int(match[1]):
        body += sock.recv(65536)


def count(tree: Path, nginx_port: int, requests: int, directory: Path) -> int:
    port = free_port()
    folder = directory / f"run-{requests}"
    folder.mkdir()
    (folder / "objects.yaml").write_text(service("nginx", 80, nginx_port) + ROUTE.format(port=port))
    out = folder / "callgrind.out"
    command = [need("valgrind", "valgrind"), "--tool=callgrind", f"--callgrind-out-file={out}"]
    command += [sys.executable, str(BILAYER), "run", "-f", str(folder), "--address", "127.0.0.1"]
    command += ["--admin-port", str(free_port()), "--no-access-log", "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": f"{tree}/operator:{tree}"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, 600)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            for _ in range(requests):
                one(sock)
    finally:
        process.terminate()
        process.wait(600)
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError("callgrind wrote no total")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", default=str(ROOT), help="the checkout whose code runs (default: this one)")
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    directory = workdir()
    tree = Path(args.tree).resolve()
    with nginx(directory) as nginx_port:
        idle = count(tree, nginx_port, 0, directory)
        busy = count(tree, nginx_port, args.requests, directory)
    shutil.rmtree(directory, ignore_errors=True)
    print(f"{tree}: {(busy - idle) / args.requests:,.0f} instructions per request")


if __name__ == "__main__":
    main()
