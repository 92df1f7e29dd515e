"""The dataplane runtime: holds the current table and the listeners serving it.

Applying a table validates it, opens the listeners it adds, hands changed configuration to
the listeners it keeps (new connections use it; established ones keep theirs), drains the
listeners it removes, and writes it to disk so a restarted pod serves before the operator
reaches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from . import delta
from .eventloop import freeze_heap
from .health import HealthRegistry
from .l7.tls import Contexts, build_contexts
from .logs import fields
from .table import TLS, Backend, Listener, Table, TableError

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from .tracing import Tracer

log = logging.getLogger("bilayer.dataplane")


class GenerationConflict(Exception):
    """A push older than the table being served; the pusher should move past `current`."""

    def __init__(self, pushed: int, current: int) -> None:
        super().__init__(
            f"generation {pushed} is not newer than the served generation {current}; "
            f"push with a generation above {current}"
        )
        self.current = current


class NotServed(Exception):
    """A valid table that not every worker of the pod applied (one exited, refused or did
    not answer in time): the pod keeps claiming the table it served before."""


class StaleTerm(Exception):
    """A push from an operator whose leadership term is older than one already seen: a
    deposed leader that does not know it yet. Refused, so that it cannot undo the
    current leader's table."""


def parse_term(value: str) -> tuple[int, str]:
    """A term header, "<leaseTransitions>/<holder>"; ValueError when malformed."""
    count, sep, holder = value.partition("/")
    if not sep or not holder or not count.isdigit() or len(value) > 300:
        raise ValueError(f"a term is <lease transitions>/<holder>, not {value[:80]!r}")
    return int(count), holder


class ServingListener(Protocol):
    """A running listener on one port; L4 and L7 listeners implement it."""

    kind: str

    def update(self, listener: Listener, table: Table) -> None:
        """Use this configuration for new connections and requests."""

    def stop_accepting(self) -> None:
        """Close the listening socket; established connections keep going."""

    async def drain(self, grace: float) -> None:
        """Wait up to grace seconds for connections to end, then close the rest."""

    @property
    def active_connections(self) -> int: ...


# Opens a listener on a port: (dataplane, port, listener config, table) -> running listener.
ListenerFactory = Callable[["Dataplane", int, Listener, Table], Awaitable[ServingListener]]


@dataclass
class Settings:
    """How the dataplane runs; from the command line or Helm values."""

    address: str = "0.0.0.0"
    state_dir: Path | None = None
    drain_grace: float = 30.0
    access_log: bool = True
    access_log_sample: float = 1.0
    connection_log: bool = True
    # Per route rule metric families (bilayer_l7_route_*): a series set per rule, so a
    # table of thousands of rules may be more than a Prometheus should take per pod.
    route_metrics: bool = True
    max_body_size: int = 0  # 0: no limit
    header_timeout: float = 10.0  # a request head, trailers, a TLS handshake (slowloris)
    keepalive_timeout: float = 60.0  # idle time between requests on a client connection
    idle_timeout: float = 60.0  # no byte either way during an exchange or in a tunnel
    min_body_rate: int = 240  # bytes/s a request body must keep up after 5 s; 0: no minimum
    max_header_bytes: int = 60 * 1024  # a request's or response's head, and its trailers
    max_headers: int = 100  # header fields per head (and per trailer section)
    connect_timeout: float = 5.0  # L7 connects to endpoints
    # After an HTTP/2 connection error, how long the client's further bytes are read and
    # dropped before the close (TLS cannot half-close: the client sees the close only then).
    h2_shut_linger: float = 1.0
    max_client_connections: int = 100_000  # per L7 listener; beyond it a fast 503
    via: bool = False  # add "Via: 1.1 bilayer" to forwarded requests
    otlp_endpoint: str | None = None  # OTLP/HTTP collector for spans; None: tracing off
    trace_sampling: float = 0.01  # share of traces started here that are sampled (0-1)
    # Processes serving the listeners (dataplane.workers); 1: this process, as always.
    workers: int = 1
    worker_sockets: str = "reuseport"  # how connections reach workers: reuseport | shared
    worker_apply_timeout: float = 60.0  # a worker slower to apply a table is restarted
    # In a worker process (dataplane.workers): bind TCP ports with SO_REUSEPORT, so that
    # every worker has a socket of its own on each port and the kernel spreads clients
    # (UDP ports always, with workers: a shared UDP socket would split a client's datagrams).
    reuse_port: bool = False
    # In a worker process: listening sockets the supervisor bound and handed over, by port
    # (one socket shared by every worker); a listener uses its port's instead of binding.
    listening_sockets: dict[int, socket.socket] = field(default_factory=dict, compare=False, repr=False)


class Dataplane:
    """The table being served and its listeners."""

    def __init__(
        self,
        settings: Settings | None = None,
        factories: dict[str, ListenerFactory] | None = None,
        *,
        tracer: Tracer | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.factories = default_factories() if factories is None else factories
        # Spans go to tracer: the one given (tests), or one exporting to --otlp-endpoint.
        self.tracer = tracer if tracer is not None else open_tracer(self.settings)
        self.table: Table | None = None
        self.listeners: dict[int, ServingListener] = {}  # TCP ports
        self.udp_listeners: dict[int, ServingListener] = {}  # UDP ports (kind "udp")
        self.listener_errors: dict[int, str] = {}
        self.health = HealthRegistry()
        # SSL contexts by port, built from the table before it is swapped in, and the TLS
        # part each was built from (an unchanged part keeps its contexts).
        self.tls_contexts: dict[int, Contexts] = {}
        self._tls_sources: dict[int, TLS] = {}
        self.tables_applied = 0
        self.tables_refused = 0
        self.deltas_applied = 0
        self._lock = asyncio.Lock()
        self._draining: set[asyncio.Task[None]] = set()
        self._persisting: asyncio.Task[None] | None = None
        self.persist_delay = 1.0  # seconds; saves of a burst of changes are merged
        # The newest leadership term that pushed to this pod (see controlplane.leader).
        self.term: tuple[int, str] | None = None
        self.stale_pushes = 0

    @property
    def ready(self) -> bool:
        return self.table is not None

    def worker_summary(self) -> list[dict[str, object]] | None:
        """The worker processes and what each serves; None: this process serves."""
        return None

    async def gather_metrics(self) -> None:
        """Called before /metrics is rendered; a pod of workers asks them for theirs."""

    def serving_metrics(self) -> Iterator[Metric]:
        """The metric families of what serves: listeners, endpoint health, tracing."""
        from .metrics import serving_metrics

        return serving_metrics(self)

    @property
    def state_file(self) -> Path | None:
        return self.settings.state_dir / "table.json" if self.settings.state_dir else None

    def judge(self, term: str | None) -> tuple[int, str] | None:
        """Fencing, without recording anything: the pushed term (None: an operator without
        leader election), or StaleTerm when it is older than the one seen, or TableError
        when it is malformed. The admin API asks before it reads a body."""
        if term is None:
            if self.term is not None:
                self.stale_pushes += 1
                raise StaleTerm(f"this pod is programmed by term {self._term_text()}; a push needs a term")
            return None
        try:
            pushed = parse_term(term)
        except ValueError as err:
            raise TableError(f"Bilayer-Term header: {err}") from None
        current = self.term
        if current is not None and (
            pushed[0] < current[0] or (pushed[0] == current[0] and pushed != current)
        ):
            self.stale_pushes += 1
            raise StaleTerm(f"term {term} is older than term {self._term_text()}, which programs this pod")
        return pushed

    def admit(self, term: str | None) -> None:
        """Fencing: accept a push of this term (None: an operator without leader
        election), or raise StaleTerm. A newer term is remembered (and saved)."""
        pushed = self.judge(term)
        if pushed is not None and pushed != self.term:
            self.term = pushed
            self._save_term()
            log.info("new leader term", extra=fields(term=term))

    @property
    def term_text(self) -> str | None:
        return self._term_text() if self.term else None

    def _term_text(self) -> str:
        return f"{self.term[0]}/{self.term[1]}" if self.term else "none"

    def _save_term(self) -> None:
        if self.settings.state_dir is None or self.term is None:
            return
        self._write_atomically(self.settings.state_dir / "term", self._term_text(), ".term-", "term")

    @staticmethod
    def _write_atomically(path: Path, text: str, prefix: str, what: str) -> None:
        """Write a temporary file and rename it over path: a crash mid-write must never
        leave a torn file to load (a torn term would not parse, and the restarted pod
        would take pushes of any term). mkstemp makes it 0600: a table holds TLS keys."""
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix)
            with os.fdopen(fd, "w") as out:
                out.write(text)
            os.replace(tmp, path)
            tmp = None
        except OSError as err:
            log.error(f"cannot save the {what}", extra=fields(path=str(path), error=str(err)))
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def load_term(self) -> None:
        """The newest term seen before a restart, so a restarted pod stays fenced."""
        if self.settings.state_dir is None:
            return
        path = self.settings.state_dir / "term"
        try:
            self.term = parse_term(path.read_text().strip()) if path.exists() else None
        except (OSError, ValueError) as err:
            log.error("ignoring the saved term", extra=fields(path=str(path), error=str(err)))

    async def load_persisted(self) -> bool:
        """Serve the last good table from disk, if there is one; True when loaded."""
        self.load_term()
        path = self.state_file
        if path is None or not path.exists():
            return False
        try:
            table = Table.parse(path.read_bytes())
        except (OSError, TableError) as err:
            log.error("ignoring the saved table", extra=fields(path=str(path), error=str(err)))
            return False
        await self.apply(table, persist=False)
        log.info(
            "serving the saved table",
            extra=fields(version=table.version, generation=table.generation),
        )
        return True

    async def apply(
        self,
        table: Table,
        *,
        persist: bool = True,
        term: str | None = None,
        fenced: bool = False,
        older: bool = False,
        document: bytes | None = None,
    ) -> bool:
        """Swap table in; False when it is the table already served (nothing changes).

        Raises GenerationConflict for a push older than the current table, and (when
        fenced: a push over the admin API) StaleTerm for a push of an older term; older lets
        an older generation in (a worker put back on the table its pod claims); document is
        the JSON table was parsed from, if any (a pod of workers forwards it). The caller has
        validated the table (Table.parse); listeners that cannot bind are reported in
        listener_errors and the rest of the table is served.
        """
        table = table if table.version else table.stamped(table.generation)
        async with self._lock:
            if fenced:
                self.admit(term)
            if not await self._swap(table, older=older):
                return False
            if persist:
                self._persist(table)
        freeze_heap()  # a whole new table: long-lived, keep it out of collections
        log.info(
            "table applied",
            extra=fields(
                version=table.version,
                generation=table.generation,
                listeners=sorted(table.listeners),
            ),
        )
        return True

    async def apply_delta(
        self, change: delta.Delta, *, term: str | None = None, fenced: bool = False
    ) -> bool:
        """Patch the served table with change and swap the result in, as apply() does.

        Raises delta.BaseMismatch when change was made for another version (the pusher
        then sends the whole table), TableError for a delta that does not check out,
        GenerationConflict as apply() does.
        """
        async with self._lock:
            if fenced:
                self.admit(term)
            if self.table is None:
                raise delta.BaseMismatch("no table is served yet; push the whole table")
            if self.table.version == change.version:
                return False
            table = delta.patch(self.table, change)
            await self._swap(table)
            self.deltas_applied += 1
            self._persist_soon()
        log.info(
            "delta applied",
            extra=fields(version=table.version, generation=table.generation, changes=len(change.changes)),
        )
        return True

    async def _swap(self, table: Table, *, older: bool = False) -> bool:
        """Serve table (the lock is held); False when it is the one already served."""
        current = self.table
        if current is not None and current.version == table.version:
            return False
        if current is not None and table.generation <= current.generation and not older:
            self.tables_refused += 1
            raise GenerationConflict(table.generation, current.generation)
        scope = _scope(current, table)
        self.tls_contexts, self._tls_sources = self._prepare_tls(table, scope)
        await self._reconcile_listeners(table, current, scope)
        if scope is None or any(_has_l4(table.listeners.get(p, _NO_LISTENER)) for p in scope):
            self.health.retain(table)  # health checks are set on L4 listeners
        self.table = table
        self.tables_applied += 1
        return True

    def _prepare_tls(
        self, table: Table, scope: set[int] | None
    ) -> tuple[dict[int, Contexts], dict[int, TLS]]:
        """Load every certificate first: a bad one refuses the table, nothing changes."""
        contexts, sources = {}, {}
        if scope is not None:  # only these ports changed
            contexts, sources = dict(self.tls_contexts), dict(self._tls_sources)
            for port in scope:
                contexts.pop(port, None)
                sources.pop(port, None)
        for port in scope if scope is not None else table.listeners:
            listener = table.listeners.get(port)
            if listener is None or listener.l7 is None or listener.l7.tls is None:
                continue
            tls = sources[port] = listener.l7.tls
            kept = self._tls_sources.get(port)
            if kept is not None and (kept is tls or kept == tls) and port in self.tls_contexts:
                contexts[port] = self.tls_contexts[port]
                continue
            try:
                contexts[port] = build_contexts(tls)
            except (ssl.SSLError, OSError, ValueError) as err:
                self.tables_refused += 1
                problem = f"certificate or key does not load: {err}"
                raise TableError(f"listeners.{port}.l7.tls: {problem}") from None
        return contexts, sources

    async def _reconcile_listeners(self, table: Table, current: Table | None, scope: set[int] | None) -> None:
        for port in sorted(set(self.listeners) - set(table.listeners)):
            self._retire(port)
        ports = table.listeners.keys() if scope is None else scope
        if scope is not None:  # L7 listeners follow every table: they track its version
            ports = scope | {p for p, s in self.listeners.items() if s.kind == "l7"}
        for port in sorted(ports):
            listener = table.listeners.get(port)
            if listener is None:
                continue
            kind = listener.tcp_kind
            running = self.listeners.get(port)
            if running is not None and running.kind == kind:
                if current is None or not _unchanged(port, listener, current, table):
                    running.update(listener, table)
                continue
            if running is not None:
                self._retire(port)
            if kind is not None:
                await self._open(port, kind, listener, table)
        await self._reconcile_udp(table, current, ports)

    async def _reconcile_udp(self, table: Table, current: Table | None, ports: Iterable[int]) -> None:
        """The UDP faces: a port's UDP listener lives beside its TCP one."""
        for port in [p for p in self.udp_listeners if table.listeners.get(p, _NO_LISTENER).udp is None]:
            self._retire(port, udp=True)
        for port in sorted(ports):
            listener = table.listeners.get(port)
            if listener is None or listener.udp is None:
                continue
            running = self.udp_listeners.get(port)
            if running is None:
                await self._open(port, "udp", listener, table)
            elif current is None or not _unchanged(port, listener, current, table):
                running.update(listener, table)

    async def _open(self, port: int, kind: str, listener: Listener, table: Table) -> None:
        factory = self.factories.get(kind)
        udp = kind == "udp"
        if factory is None:
            self.listener_errors[port] = f"no {kind} listener support in this dataplane"
            return
        try:
            serving = await factory(self, port, listener, table)
        except OSError as err:
            where = f"{'udp ' if udp else ''}{self.settings.address}:{port}"
            self.listener_errors[port] = f"cannot listen on {where}: {err.strerror or err}"
            log.error("listener failed", extra=fields(port=port, error=self.listener_errors[port]))
            return
        if (self.listener_errors.get(port) or "").startswith("cannot listen on udp ") == udp:
            self.listener_errors.pop(port, None)  # this face's error, not the other's
        (self.udp_listeners if udp else self.listeners)[port] = serving
        log.info("listener started", extra=fields(port=port, kind=kind))

    def _retire(self, port: int, grace: float | None = None, *, udp: bool = False) -> None:
        serving = (self.udp_listeners if udp else self.listeners).pop(port)
        serving.stop_accepting()
        grace = self.settings.drain_grace if grace is None else grace
        task = asyncio.get_running_loop().create_task(serving.drain(grace))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)
        log.info(
            "listener removed; draining",
            extra=fields(port=port, connections=serving.active_connections, grace=grace),
        )

    def _persist_soon(self) -> None:
        """Save the served table within persist_delay: at 10,000 routes the document is
        2 MB, too much to write for every delta of a burst."""
        if self.state_file is None or (self._persisting is not None and not self._persisting.done()):
            return
        self._persisting = asyncio.get_running_loop().create_task(self._persist_later())

    async def _persist_later(self) -> None:
        await asyncio.sleep(self.persist_delay)
        if self.table is not None:
            self._persist(self.table)

    def _persist(self, table: Table) -> None:
        path = self.state_file
        if path is None:
            return
        self._write_atomically(path, table.to_json(), ".table-", "table")

    async def close(self, grace: float | None = None) -> None:
        """Stop every listener and drain connections for up to grace seconds."""
        if self._persisting is not None and not self._persisting.done():
            self._persisting.cancel()
            if self.table is not None:
                self._persist(self.table)  # what a save in waiting would have written
        for port in list(self.listeners):
            self._retire(port, grace)
        for port in list(self.udp_listeners):
            self._retire(port, grace, udp=True)
        if self._draining:
            await asyncio.gather(*self._draining, return_exceptions=True)
        await self.health.close()
        if self.tracer is not None:
            await self.tracer.close()  # the spans of the exchanges just drained, too


_NO_LISTENER = Listener()


def _scope(current: Table | None, table: Table) -> set[int] | None:
    """The ports a delta changed, when table came from current by a delta that changed no
    cluster; None: look at every port."""
    paths = table.changed_since(current.version) if current is not None else None
    if paths is None or any(path.is_cluster for path in paths):
        return None
    return {path.port for path in paths}


def _unchanged(port: int, listener: Listener, current: Table, table: Table) -> bool:
    """Whether the L4 listener on port serves exactly as before: the same part and the
    same clusters. L7 listeners are always updated: they rebuild only what changed."""
    if listener.l7 is not None or current.listeners.get(port) is not listener:
        return False  # an L7 listener looks at what changed itself (l7.config)
    if table.clusters is current.clusters:
        return True
    return all(
        table.clusters.get(b.cluster) is current.clusters.get(b.cluster)
        for b in _l4_backends(listener)
        if b.cluster is not None
    )


def open_tracer(settings: Settings) -> Tracer | None:
    """The tracer settings ask for; None when tracing is off. The OpenTelemetry SDK is
    imported here, only when it is on."""
    if not settings.otlp_endpoint:
        return None
    from . import tracing

    return tracing.open_tracer(settings.otlp_endpoint, settings.trace_sampling)


def _has_l4(listener: Listener) -> bool:
    return listener.l4 is not None or listener.passthrough is not None or listener.udp is not None


def _l4_backends(listener: Listener) -> Iterator[Backend]:
    """The backends of a port's L4 faces."""
    if listener.l4 is not None:
        yield from listener.l4.backends
    if listener.passthrough is not None:
        for route in listener.passthrough.routes.values():
            yield from route.backends
    if listener.udp is not None:
        yield from listener.udp.backends


def default_factories() -> dict[str, ListenerFactory]:
    """The L4 and L7 listener implementations."""
    from .l4.listener import open_l4
    from .l7.listener import open_l7
    from .udp.listener import open_udp

    return {"l4": open_l4, "l7": open_l7, "udp": open_udp}
