"""An OTLP/HTTP trace sink for the benchmarks: accepts POST /v1/traces and counts bytes.

It decodes nothing, as a collector's receiver hands batches on without looking at them
much; what the benchmarks measure is what exporting costs the proxy.

    .venv/bin/python bench/otlp_sink.py PORT
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from aiohttp import web
from common import free_port, process


async def traces(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=b"", content_type="application/x-protobuf")


@contextmanager
def sink() -> Iterator[str]:
    """A sink in a process of its own; yields its base URL (for --otlp-endpoint)."""
    port = free_port()
    with process([sys.executable, __file__, str(port)], port):
        yield f"http://127.0.0.1:{port}"


if __name__ == "__main__":
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", traces)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
