"""The HTTP/1.1 head work of one proxied request, piece by piece, in this process (no sockets):
what parsing, validating and building heads cost, apart from system calls and the event loop.

    .venv/bin/python bench/heads.py [--tree CHECKOUT] [--number 200000]

Each line is the best of 5 timings of N calls, in microseconds per call: the request wrk
sends through a RequestReader (llhttp and its callbacks, framing.request_head) to a sink that
keeps nothing; framing.request_head alone, on the fields llhttp handed over; the response
nginx sends through a ResponseReader; framing.response_head alone; the request head for the
backend (framing.request_bytes) and the response head for the client (the bytes
exchange._send_response_head formats). Compare two checkouts with --tree.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import callgrind_total

ROOT = Path(__file__).resolve().parent.parent

REQUEST = b"GET /api/x HTTP/1.1\r\nHost: h.example.com\r\n\r\n"  # what wrk sends
RESPONSE = (  # what nginx answers (17-byte body)
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 30 Nov 2026 23:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 17\r\nConnection: keep-alive\r\n\r\n"
    b"hello from nginx\n"
)
BROWSER = (  # a browser-like request: more fields, each a Python callback and a validation step
    b"GET /api/items?page=2 HTTP/1.1\r\nHost: h.example.com\r\nUser-Agent: Mozilla/5.0 (X11; Linux)\r\n"
    b"Accept: text/html,application/xhtml+xml\r\nAccept-Language: en-US,en;q=0.9\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\nCookie: session=0123456789abcdef\r\n"
    b"Referer: https://h.example.com/\r\nConnection: keep-alive\r\n\r\n"
)


NAMES = [
    "request read: llhttp + callbacks + request_head (wrk's request)",
    "  framing.request_head alone (1 field)",
    "request read, a browser's request (9 fields)",
    "  framing.request_head alone (9 fields)",
    "response read: llhttp + callbacks + response_head (nginx's answer)",
    "  framing.response_head alone (5 fields)",
    "request head build: framing.request_bytes (5 fields)",
    "response head build: status line + serialize + framing",
]


def measure(number: int, only: int | None = None) -> list[tuple[str, float]]:
    from dataplane.l7 import framing
    from dataplane.l7.framing import RequestHead, ResponseHead
    from dataplane.l7.reader import Limits, RequestReader, ResponseReader

    class Requests:
        def request_head(self, head: RequestHead) -> None:
            pass

        def request_body(self, data: bytes) -> None:
            pass

        def request_end(self) -> None:
            pass

    class Responses:
        def response_head(self, head: ResponseHead) -> None:
            pass

        def response_body(self, data: bytes) -> None:
            pass

        def response_end(self) -> None:
            pass

    limits = Limits()
    requests = RequestReader(Requests(), limits)
    responses = ResponseReader(limits)
    sink = Responses()
    fields = [(b"Host", b"h.example.com")]
    browser_fields = [tuple(line.split(b": ", 1)) for line in BROWSER.split(b"\r\n")[1:] if b": " in line]
    response_fields = [tuple(line.split(b": ", 1)) for line in RESPONSE.split(b"\r\n")[1:6]]
    headers = [(b"x-forwarded-for", b"127.0.0.1"), (b"x-forwarded-proto", b"http")]
    headers += [
        (b"x-forwarded-host", b"h.example.com"),
        (b"x-request-id", b"0123456789abcdef0123456789abcdef"),
    ]
    parsed = framing.response_head(200, response_fields, True, "GET", b"")

    def response_bytes() -> bytes:
        return b"%s%s%s\r\n" % (
            b"HTTP/1.1 200 OK\r\n",
            framing.serialize(parsed.headers),
            b"content-length: 17\r\n",
        )

    def read_response() -> None:
        responses.expect(sink, "GET", b"")
        responses.feed(RESPONSE)

    calls = [
        lambda: requests.feed(REQUEST),
        lambda: framing.request_head(b"GET", "1.1", b"/api/x", fields, keep_alive=True, upgrading=False),
        lambda: requests.feed(BROWSER),
        lambda: framing.request_head(
            b"GET", "1.1", b"/api/items?page=2", browser_fields, keep_alive=True, upgrading=False
        ),
        read_response,
        lambda: framing.response_head(200, response_fields, True, "GET", b""),
        lambda: framing.request_bytes("GET", b"/api/x", b"h.example.com", headers, framing.NO_BODY),
        response_bytes,
    ]
    cases = list(zip(NAMES, calls, strict=True))
    if only is not None:  # under callgrind: just the calls, counted from outside
        name, call = cases[only]
        for _ in range(number):
            call()
        return []
    results = []
    for name, call in cases:
        best = min(timeit.repeat(call, number=number, repeat=5)) / number * 1e6
        results.append((name, best))
    return results


CASES = len(NAMES)


def instructions(case: int, number: int, tree: Path) -> int:
    """Instructions callgrind counts for a process that makes number calls of case."""
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "callgrind.out"
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__]
        command += ["--child", "--case", str(case), "--number", str(number)]
        env = {**os.environ, "PYTHONPATH": str(tree)}
        subprocess.run(command, env=env, check=True, capture_output=True)
        return callgrind_total(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", help="the checkout whose code runs (default: this one)")
    parser.add_argument("--number", type=int, default=200000)
    parser.add_argument(
        "--instructions", action="store_true", help="count instructions per call with callgrind instead"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.instructions:
        tree = Path(args.tree or ROOT).resolve()
        number = min(args.number, 5000)
        idle = instructions(0, 0, tree)
        for case in range(CASES):
            per = (instructions(case, number, tree) - idle) / number
            print(f"{per:9,.0f} instructions  {NAMES[case]}", flush=True)
        return
    if args.child and args.case is not None:
        measure(args.number, args.case)
        return
    if args.tree and not args.child:
        # PYTHONPATH comes before the editable install's path: the tree's dataplane is imported
        command = [sys.executable, __file__, "--child", "--number", str(args.number)]
        subprocess.run(command, env={**os.environ, "PYTHONPATH": str(Path(args.tree).resolve())}, check=True)
        return
    if not args.child:
        sys.path.insert(0, str(ROOT))
    for name, micros in measure(args.number):
        print(f"{micros:7.2f} µs  {name}")


if __name__ == "__main__":
    main()
