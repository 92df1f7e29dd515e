"""Instructions per proxied HTTP request, counted by valgrind's callgrind: unlike req/s, the
count does not move with what else the machine is doing.

    .venv/bin/python bench/instructions.py [--tree CHECKOUT] [--requests 2000] [--warmup 0]
        [--flags "..."]

`bilayer run` (the code of CHECKOUT, this one by default) runs under callgrind in front of
nginx; one client sends N keep-alive GETs, one after the other. The same is done with no
request; per request = (instructions with N - instructions with 0) / N. About two minutes.
--warmup W sends W requests in both runs (W + N, and W): one-time costs of the first
requests (a first span export, say) then count in neither.
Needs valgrind (Debian package) and nginx. --flags are more flags for `bilayer run`; `{otlp}`
in them is the URL of an OTLP/HTTP sink (bench/otlp_sink.py), e.g.
`--flags "--otlp-endpoint {otlp} --trace-sampling 1"`: callgrind counts every thread, so the
export thread's work is in the figure.
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

from common import BILAYER, ROOT, callgrind_total, free_port, need, nginx, service, wait_port, workdir
from compare_l7 import ROUTE
from otlp_sink import sink

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


def count(tree: Path, nginx_port: int, requests: int, directory: Path, flags: list[str]) -> int:
    port = free_port()
    folder = directory / f"run-{requests}"
    folder.mkdir()
    (folder / "objects.yaml").write_text(service("nginx", 80, nginx_port) + ROUTE.format(port=port))
    out = folder / "callgrind.out"
    command = [need("valgrind", "valgrind"), "--tool=callgrind", f"--callgrind-out-file={out}"]
    command += [sys.executable, str(BILAYER), "run", "-f", str(folder), "--address", "127.0.0.1"]
    command += ["--admin-port", str(free_port()), "--no-access-log", "--log-level", "warning", *flags]
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
    return callgrind_total(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", default=str(ROOT), help="the checkout whose code runs (default: this one)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=0, help="requests sent in both runs")
    parser.add_argument("--flags", default="", help="more bilayer run flags ({otlp}: an OTLP sink's URL)")
    args = parser.parse_args()
    directory = workdir()
    tree = Path(args.tree).resolve()
    with nginx(directory) as nginx_port, sink() as otlp:
        flags = args.flags.replace("{otlp}", otlp).split()
        idle = count(tree, nginx_port, args.warmup, directory, flags)
        busy = count(tree, nginx_port, args.warmup + args.requests, directory, flags)
    shutil.rmtree(directory, ignore_errors=True)
    print(f"{tree} {args.flags}: {(busy - idle) / args.requests:,.0f} instructions per request")


if __name__ == "__main__":
    main()
