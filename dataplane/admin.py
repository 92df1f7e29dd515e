"""The admin API of a dataplane: push and read the table, health, readiness, metrics.

``PUT /v1/table`` replaces the table; ``PATCH /v1/table`` applies a delta to the served
version (412 when the pod serves another version: push the whole table then). Every
path except /healthz and /readyz needs ``Authorization: Bearer <token>``. Without a
token configured the API must be bound to loopback (the caller enforces that).

``build_metrics_app`` serves only /metrics, /healthz and /readyz, without a token, for a
port of its own: a scraper then holds no credential that could also replace the table.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from . import delta
from .eventloop import gc_paused
from .logs import fields
from .metrics import DataplaneCollector
from .runtime import Dataplane, GenerationConflict, NotServed, StaleTerm
from .table import Table, TableError

log = logging.getLogger("bilayer.admin")

StatusProvider = Callable[[], dict[str, Any]]
_OPEN_PATHS = frozenset({"/healthz", "/readyz"})
MAX_TABLE_BYTES = 256 * 1024 * 1024
# The pushing operator's leadership term, "<leaseTransitions>/<holder>": a pod refuses
# (403) a push whose term is older than one it has seen, so a deposed leader that has
# not noticed yet cannot undo its successor's table.
TERM_HEADER = "Bilayer-Term"


def _json(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=lambda v: json.dumps(v, indent=2) + "\n")


def _too_deep(dataplane: Dataplane) -> web.Response:
    dataplane.tables_refused += 1
    return _json({"error": "not a table: JSON nested too deep"}, status=400)


def _stale(err: StaleTerm) -> web.Response:
    log.warning("push from an older leader term refused", extra=fields(error=str(err)))
    return _json({"error": str(err)}, status=403)


def _not_served(err: NotServed, served: dict[str, Any]) -> web.Response:
    """503: the push was valid but not every worker took it; the answer names the table
    the pod still serves everywhere, and the pusher retries."""
    log.error("table not applied by every worker", extra=fields(error=str(err)))
    return _json({"error": str(err), **served}, status=503)


def build_app(
    dataplane: Dataplane,
    token: str | None,
    status_provider: StatusProvider | None = None,
    on_push: Callable[[Table], Awaitable[None]] | None = None,
) -> web.Application:
    """The aiohttp application serving the admin API for dataplane."""

    @web.middleware
    async def require_token(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if token and request.path not in _OPEN_PATHS:
            # aiohttp hands undecodable header bytes on as surrogates: encode them back to
            # the bytes that were sent, so any such header compares as wrong, never raises.
            sent = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(sent, f"Bearer {token}".encode()):
                return _json({"error": "missing or wrong bearer token"}, status=401)
        return await handler(request)

    def table_summary() -> dict[str, Any]:
        table = dataplane.table
        listeners: dict[str, Any] = {}
        if table is not None:
            for port, listener in sorted(table.listeners.items()):
                error = dataplane.listener_errors.get(port)
                listeners[str(port)] = {
                    "kind": "+".join(k for k in (listener.tcp_kind, listener.udp and "udp") if k),
                    "state": "error" if error else "serving",
                    **({"error": error} if error else {}),
                }
        summary: dict[str, Any] = {
            "version": table.version if table else None,
            "generation": table.generation if table else None,
            "term": dataplane.term_text,
            "listeners": listeners,
        }
        workers = dataplane.worker_summary()
        if workers is not None:
            summary["workers"] = workers
        return summary

    def brief() -> dict[str, Any]:
        """The answer to a push: what is served now, and only the listeners that failed
        (a push answer for 1,000 listeners listing each one cost milliseconds per delta)."""
        table = dataplane.table
        return {
            "version": table.version if table else None,
            "generation": table.generation if table else None,
            "term": dataplane.term_text,
            "failedListeners": {str(p): e for p, e in sorted(dataplane.listener_errors.items())},
        }

    async def get_table(_: web.Request) -> web.Response:
        return _json(table_summary())

    def refuse_term(request: web.Request) -> web.Response | None:
        """The answer to a push whose term is older or malformed, before its body is read:
        a deposed leader's push is a 403 whatever it carries."""
        try:
            dataplane.judge(request.headers.get(TERM_HEADER))
        except StaleTerm as err:
            return _stale(err)
        except TableError as err:
            return _json({"error": str(err)}, status=400)
        return None

    async def put_table(request: web.Request) -> web.Response:
        if (refused := refuse_term(request)) is not None:
            return refused
        body = await request.read()
        try:
            with gc_paused():  # a table of 10,000 routes is some 200,000 objects
                table = Table.parse(body)
        except RecursionError:
            return _too_deep(dataplane)
        except TableError as err:
            dataplane.tables_refused += 1
            log.warning("table refused", extra=fields(error=str(err), remote=request.remote))
            return _json({"error": str(err)}, status=400)
        try:
            changed = await dataplane.apply(
                table, term=request.headers.get(TERM_HEADER), fenced=True, document=body
            )
        except StaleTerm as err:
            return _stale(err)
        except GenerationConflict as err:
            return _json({"error": str(err), **brief()}, status=409)
        except NotServed as err:
            return _not_served(err, brief())
        except TableError as err:  # found while preparing, e.g. a certificate that does not load
            log.warning("table refused", extra=fields(error=str(err), remote=request.remote))
            return _json({"error": str(err)}, status=400)
        if on_push is not None:
            await on_push(table)
        return _json({"changed": changed, **brief()})

    async def patch_table(request: web.Request) -> web.Response:
        """Apply a delta (dataplane.delta): the parts that changed since a version."""
        if (refused := refuse_term(request)) is not None:
            return refused
        body = await request.read()
        try:
            change = delta.parse(body)
            changed = await dataplane.apply_delta(change, term=request.headers.get(TERM_HEADER), fenced=True)
        except RecursionError:  # json.loads of arrays nested 100,000 deep
            return _too_deep(dataplane)
        except StaleTerm as err:
            return _stale(err)
        except delta.BaseMismatch as err:
            return _json({"error": str(err), **brief()}, status=412)
        except GenerationConflict as err:
            return _json({"error": str(err), **brief()}, status=409)
        except NotServed as err:
            return _not_served(err, brief())
        except TableError as err:
            dataplane.tables_refused += 1
            log.warning("delta refused", extra=fields(error=str(err), remote=request.remote))
            return _json({"error": str(err)}, status=400)
        if on_push is not None and dataplane.table is not None:
            await on_push(dataplane.table)
        return _json({"changed": changed, **brief()})

    async def status(_: web.Request) -> web.Response:
        assert status_provider is not None
        return _json(status_provider())

    app = web.Application(middlewares=[require_token], client_max_size=MAX_TABLE_BYTES)
    _add_read_only_routes(app, dataplane)
    app.router.add_get("/v1/table", get_table)
    app.router.add_put("/v1/table", put_table)
    app.router.add_patch("/v1/table", patch_table)
    if status_provider is not None:
        app.router.add_get("/v1/status", status)
    return app


def build_metrics_app(dataplane: Dataplane) -> web.Application:
    """/metrics, /healthz and /readyz without a token; nothing here can change the table."""
    # Requests here carry no body worth reading: a small cap keeps a stray upload cheap.
    app = web.Application(client_max_size=64 * 1024)
    _add_read_only_routes(app, dataplane)
    return app


def _add_read_only_routes(app: web.Application, dataplane: Dataplane) -> None:
    """The GET routes both the admin and the metrics port serve."""
    registry = CollectorRegistry()
    registry.register(DataplaneCollector(dataplane))

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        if dataplane.ready:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="no table loaded yet\n")

    async def metrics(_: web.Request) -> web.Response:
        await dataplane.gather_metrics()
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start app on host:port; returns the runner to clean up."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    return runner


def is_loopback(host: str) -> bool:
    """Whether host is a loopback address (or "localhost"): a name such as
    127.example.com resolves anywhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
