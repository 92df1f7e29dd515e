"""Shared pieces of the benchmarks: servers on loopback, wrk and redis-benchmark runs, tables.

Every benchmark runs Bilayer and HAProxy against the same backend with the same load
generator in the same run, several rounds alternating, and reports medians and ratios.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BILAYER = Path(sys.executable).with_name("bilayer")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def need(binary: str, package: str) -> str:
    path = shutil.which(binary) or shutil.which(f"/usr/sbin/{binary}")
    if not path:
        raise SystemExit(f"{binary} is missing: apt-get install {package}")
    return path


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


@contextmanager
def process(
    args: list[str], port: int | None = None, wait: float = 120.0, **kwargs: object
) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)  # type: ignore[call-overload]
    try:
        if port:
            # Generous: `bilayer run` on a loaded 2-core machine can take 20 s to start.
            wait_port(port, wait)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="bilayer-bench-"))
    path.chmod(0o755)  # nginx workers run as an unprivileged user
    return path


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log error;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        root {dir}/www;
        location = /big {{ }}
        location / {{ return 200 "hello from nginx\\n"; }}
    }}
}}
"""


@contextmanager
def nginx(directory: Path) -> Iterator[int]:
    """nginx (Debian) on a free port: / answers 17 bytes, /big is a 1 MiB file."""
    binary = need("nginx", "nginx-light")
    port = free_port()
    (directory / "www").mkdir(exist_ok=True)
    (directory / "www" / "big").write_bytes(os.urandom(1024 * 1024))
    conf = directory / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=directory, port=port))
    with process([binary, "-c", str(conf), "-p", str(directory)], port):
        yield port


@contextmanager
def haproxy(
    directory: Path, config: str, ports: list[int], name: str = "haproxy"
) -> Iterator[subprocess.Popen[bytes]]:
    binary = need("haproxy", "haproxy")
    path = directory / f"{name}.cfg"
    path.write_text(config)
    subprocess.run([binary, "-c", "-q", "-f", str(path)], check=True)
    with process([binary, "-f", str(path)]) as proc:
        for port in ports:
            wait_port(port)
        yield proc


def bilayer_accepts(flag: str) -> bool:
    """Whether this checkout's `bilayer run` has an option (--workers arrives with issue 14)."""
    out = subprocess.run([str(BILAYER), "run", "--help"], capture_output=True, text=True, check=True).stdout
    return re.search(rf"(^|[\s\[]){re.escape(flag)}\b", out) is not None


@contextmanager
def bilayer_run(
    directory: Path, manifests: str, ports: list[int], flags: list[str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    folder = directory / "objects"
    folder.mkdir(exist_ok=True)
    (folder / "bench.yaml").write_text(manifests)
    admin = free_port()
    args = [str(BILAYER), "run", "-f", str(folder), "--address", "127.0.0.1", "--admin-port", str(admin)]
    # (worker processes start before the admin API answers: seconds on a busy machine)
    with process([*args, "--no-access-log", "--log-level", "warning", *(flags or [])], admin, 180) as proc:
        for port in ports:
            wait_port(port, timeout=180)
        yield proc


def callgrind_total(out: Path) -> int:
    """The instructions a callgrind output file counted, all threads together."""
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"callgrind wrote no total in {out}")


def _descendants(pid: int) -> list[int]:
    """pid and every process below it (Bilayer's workers, nginx's worker), as far as /proc shows them."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                queue += [int(child) for child in (task / "children").read_text().split()]
            except OSError:  # the thread or process ended meanwhile
                continue
    return found


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) spent so far by pid and its descendants, the ones still alive
    and the ones that ended and were waited for (a restarted worker keeps counting)."""
    ticks = 0
    for each in _descendants(pid):
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[11:15] are utime, stime, cutime, cstime (proc(5) numbers them 14-17)
        ticks += sum(int(value) for value in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


@contextmanager
def cpu_meter(pid: int | None) -> Iterator[list[float]]:
    """Measures the CPU seconds pid's process tree spends inside the block: the list holds
    one value once the block ends (0.0 without a pid, for targets that are not proxies)."""
    spent: list[float] = []
    before = cpu_seconds(pid) if pid else 0.0
    yield spent
    spent.append(cpu_seconds(pid) - before if pid else 0.0)


def service(name: str, port: int, target: int) -> str:
    return f"""apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: bench}}
spec:
  ports: [{{name: main, port: 80, targetPort: {target}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}, namespace: bench, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{name: main, port: {target}}}]
endpoints: [{{addresses: [127.0.0.1]}}]
---
"""


@dataclass
class WrkResult:
    requests: int  # completed in the run
    requests_per_second: float
    transfer_per_second: float  # bytes
    p50_ms: float
    p99_ms: float


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}
_BYTES = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    assert match, text
    return float(match[1]) * _UNITS[match[2]]


def wrk(
    url: str, *, connections: int = 64, seconds: int = 10, threads: int = 1, headers: list[str] | None = None
) -> WrkResult:
    binary = need("wrk", "wrk")
    args = [binary, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for header in headers or []:
        args += ["-H", header]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    done = int(re.search(r"(\d+) requests in", out)[1])  # type: ignore[index]
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    assert transfer, out
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.MULTILINE)
    assert p50 and p99, out
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    if errors and errors[1]:
        raise RuntimeError(f"wrk saw errors against {url}:\n{out}")
    return WrkResult(done, rps, float(transfer[1]) * _BYTES[transfer[2]], _ms(p50[1]), _ms(p99[1]))


def redis_benchmark(port: int, pipeline: int, requests: int = 400000) -> float:
    """ops/s of SET and GET (their mean) with the given pipeline depth; 2 x requests ops in all."""
    binary = need("redis-benchmark", "redis-tools")
    args = [
        binary,
        "-p",
        str(port),
        "-P",
        str(pipeline),
        "-n",
        str(requests),
        "-t",
        "set,get",
        "-q",
        "-c",
        "50",
    ]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    values = [float(v) for v in re.findall(r"([\d.]+) requests per second", out)]
    assert len(values) == 2, out
    return statistics.mean(values)


@dataclass
class Series:
    """Several rounds of one measurement for several targets."""

    rounds: dict[str, list[float]] = field(default_factory=dict)

    def add(self, target: str, value: float) -> None:
        self.rounds.setdefault(target, []).append(value)

    def median(self, target: str) -> float:
        return statistics.median(self.rounds[target])


def table(title: str, rows: list[tuple[str, str, float, float | None, str]]) -> str:
    """Markdown: metric, target, median, ratio to HAProxy, unit."""
    lines = [
        f"### {title}",
        "",
        "| measurement | target | median | ratio to HAProxy |",
        "|---|---|---:|---:|",
    ]
    for metric, target, value, ratio, unit in rows:
        shown = f"{value:,.0f} {unit}" if value >= 100 else f"{value:.2f} {unit}"
        lines.append(f"| {metric} | {target} | {shown} | {'' if ratio is None else f'{ratio:.2f}x'} |")
    return "\n".join(lines)


def cpu_table(
    title: str,
    names: list[str],
    rate: Series,
    cpu: Series,
    base: str,
    *,
    rate_unit: str = "req/s",
    cpu_unit: str = "µs/req",
    latency: Series | None = None,
) -> str:
    """Markdown: per target the median rate and proxy CPU per unit of work, each with its
    ratio to base (HAProxy); CPU per unit does not depend on how much of the machine the
    load generator left to the proxy, the rate does."""
    head = f"| target | {rate_unit} | ratio |" + (" p99 ms |" if latency else "")
    head += f" proxy CPU, {cpu_unit} | CPU ratio |"
    lines = [f"### {title}", "", head, "|---|" + "---:|" * (head.count("|") - 2)]
    for name in names:
        if name not in rate.rounds:
            continue
        value = rate.median(name)
        row = f"| {name} | {value:,.0f} | {value / rate.median(base):.2f}x |"
        if latency:
            row += f" {latency.median(name):.2f} |"
        if name in cpu.rounds and cpu.median(name) > 0:
            per = cpu.median(name)
            row += f" {per:,.1f} | {per / cpu.median(base):.2f}x |"
        else:
            row += " | |"
        lines.append(row)
    return "\n".join(lines)


def save(name: str, data: object) -> Path:
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    path = out / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(data, indent=2, default=lambda o: o.__dict__))
    return path
