"""Where Bilayer's L7 keep-alive CPU goes: perf (C level, the kernel included) and py-spy
(Python level) on `bilayer run` with one L7Route in front of nginx, under wrk -t1 -c64.

    .venv/bin/python bench/profile_l7.py [--seconds 15] [--tree CHECKOUT]

perf (Debian linux-perf) samples the CPU clock of the dataplane process: the split by shared
object (kernel = system calls and the loopback TCP they drive; libpython = the interpreter;
uvloop, httptools, libc) and the top symbols. py-spy (PyPI) then samples its Python stacks
(--native, so time inside C extensions stays under the Python function that called them):
the share of samples under each Python function (inclusive), grouped by what the request
path does. HAProxy (`nbthread 1`) gets the same perf run, for the kernel's share of its CPU.
All are shares of a process's busy time: times the CPU per request printed with each run,
they give microseconds per request. Prints tables; keeps the raw files in bench/results/.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BILAYER,
    ROOT,
    cpu_seconds,
    free_port,
    haproxy,
    need,
    nginx,
    service,
    wait_port,
    workdir,
    wrk,
)
from compare_l7 import ROUTE
from l7 import HAPROXY_HTTP

# A sample counts for the first frame, from the leaf up, that says what the request path is
# doing: a native frame of a system call, the event loop's poll or llhttp, else the first
# Python frame (by file and function); native frames of the interpreter itself (malloc,
# dict lookups) count for the Python function that called them.
NATIVE = [
    (
        "system calls: send/write",
        re.compile(
            r"^(uv__write|uv_try_write|uv__try_write|__libc_write|__write|writev|__libc_send|__send|send|write)\b"
        ),
    ),
    ("system calls: recv/read", re.compile(r"^(uv__read|__libc_recv|__recv|recv|read|__libc_read|__read)\b")),
    ("event loop poll (epoll)", re.compile(r"^(epoll_wait|epoll_pwait|__GI_epoll|uv__io_poll)")),
    ("llhttp (C parser)", re.compile(r"llhttp")),
]
PYTHON = [
    (
        "request head validate (framing.request_head)",
        re.compile(r"^(request_head|_length|_drop_named|_target|_connection_tokens) \(.*framing\.py"),
    ),
    ("response head validate (framing.response_head)", re.compile(r"^response_head \(.*framing\.py")),
    (
        "head build (framing, exchange)",
        re.compile(
            r"^(request_bytes|serialize|chunk) \(.*framing\.py"
            r"|^(_request_head|_send_response_head|_shape_response) \(.*exchange\.py"
        ),
    ),
    ("reader: llhttp callbacks, bounded feed", re.compile(r"reader\.py")),
    ("routing (router, paths, hosts)", re.compile(r"router\.py|paths\.py|hostnames\.py|normalize")),
    ("finish: log, metrics", re.compile(r"^(finish|_log) \(.*exchange\.py|metrics|prometheus|access_log")),
    ("exchange (other)", re.compile(r"exchange\.py")),
    ("client connection", re.compile(r"client\.py")),
    ("upstream connection", re.compile(r"upstream\.py")),
    ("event loop (Python side)", re.compile(r"asyncio|uvloop|events\.py")),
]


def classify(frames: list[str]) -> str:
    for frame in reversed(frames):
        if ".py:" in frame:
            for name, pattern in PYTHON:
                if pattern.search(frame):
                    return name
            return "other Python: " + frame
        for name, pattern in NATIVE:
            if pattern.search(frame):
                return name
    return "native only (loop, interpreter)"


def perf_record(pid: int, seconds: int, out: Path) -> None:
    binary = need("perf", "linux-perf")
    args = [binary, "record", "-F", "2000", "-e", "cpu-clock", "-p", str(pid), "-o", str(out)]
    subprocess.run([*args, "--", "sleep", str(seconds)], check=True, capture_output=True)


def perf_split(data: Path) -> str:
    binary = need("perf", "linux-perf")
    lines = []
    for sort, top in (("dso", 12), ("dso,sym", 30)):
        out = subprocess.run(
            [binary, "report", "-i", str(data), "--stdio", "--sort", sort, "--percent-limit", "0.5"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rows = [line for line in out.splitlines() if line.strip() and not line.startswith("#")]
        lines += [f"perf, by {sort}:", *rows[:top], ""]
    return "\n".join(lines)


def pyspy_record(pid: int, seconds: int, out: Path) -> None:
    binary = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    args = [binary, "record", "--native", "-r", "200", "-d", str(seconds), "-f", "raw", "-o", str(out)]
    subprocess.run([*args, "-p", str(pid)], check=True, capture_output=True)


def pyspy_split(raw: Path) -> str:
    """Inclusive share per Python function, and per group of the request path."""
    inclusive: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    groups: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        leaf[frames[-1]] += count
        groups[classify(frames)] += count
    lines = [
        f"py-spy: {total} samples of the busy thread(s)",
        "",
        "what the request path is doing (see classify):",
    ]
    lines += [f"  {count / total:6.1%}  {name}" for name, count in groups.most_common(30)]
    lines += ["", "inclusive, top 45:"]
    lines += [f"  {count / total:6.1%}  {name}" for name, count in inclusive.most_common(45)]
    lines += ["", "self (leaf frame), top 25:"]
    lines += [f"  {count / total:6.1%}  {name}" for name, count in leaf.most_common(25)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--tree", default=str(ROOT), help="the checkout whose code runs (default: this one)")
    args = parser.parse_args()
    directory = workdir()
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with nginx(directory) as nginx_port:
        port = free_port()
        (directory / "objects.yaml").write_text(service("nginx", 80, nginx_port) + ROUTE.format(port=port))
        command = [str(BILAYER), "run", "-f", str(directory / "objects.yaml"), "--address", "127.0.0.1"]
        command += ["--admin-port", str(free_port()), "--no-access-log", "--log-level", "warning"]
        env = {**os.environ, "PYTHONPATH": f"{args.tree}/operator:{args.tree}"}
        proxy = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port, 120)
            url = f"http://127.0.0.1:{port}/api/x"
            wrk(url, seconds=2, headers=["Host: h.example.com"])
            report = []
            hap_port = free_port()
            config = HAPROXY_HTTP.format(port=hap_port, nginx=nginx_port, threads=1)
            with haproxy(directory, config, [hap_port]) as hap:  # the same split for HAProxy
                hap_url = f"http://127.0.0.1:{hap_port}/api/x"
                out = results / f"profile-l7-{stamp}.haproxy.perf"
                recorder = threading.Thread(target=perf_record, args=(hap.pid, args.seconds, out))
                before = cpu_seconds(hap.pid)
                recorder.start()
                result = wrk(hap_url, seconds=args.seconds + 2, headers=["Host: h.example.com"])
                recorder.join()
                spent = cpu_seconds(hap.pid) - before
                report.append(
                    f"HAProxy perf run: {result.requests_per_second:,.0f} req/s, "
                    f"{spent / result.requests * 1e6:.1f} µs CPU per request (under the profiler)"
                )
                report.append(perf_split(out))
            for name, record in (("perf", perf_record), ("py-spy", pyspy_record)):
                out = results / f"profile-l7-{stamp}.{'perf' if name == 'perf' else 'pyspy.txt'}"
                recorder = threading.Thread(target=record, args=(proxy.pid, args.seconds, out))
                before = cpu_seconds(proxy.pid)
                recorder.start()
                result = wrk(url, seconds=args.seconds + 2, headers=["Host: h.example.com"])
                recorder.join()
                spent = cpu_seconds(proxy.pid) - before
                report.append(
                    f"{name} run: {result.requests_per_second:,.0f} req/s, "
                    f"{spent / result.requests * 1e6:.1f} µs CPU per request (under the profiler)"
                )
                report.append(perf_split(out) if name == "perf" else pyspy_split(out))
        finally:
            proxy.terminate()
            proxy.wait(30)
    shutil.rmtree(directory, ignore_errors=True)
    print("\n\n".join(report))


if __name__ == "__main__":
    main()
