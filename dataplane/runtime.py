"""The dataplane runtime: holds the current table and the listeners serving it.

Applying a table validates it, opens the listeners it adds, hands changed configuration to
the listeners it keeps (new connections use it; established ones keep theirs), drains the
listeners it removes, and writes it to disk so a restarted pod serves before the operator
reaches it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .health import HealthRegistry
from .l7.tls import Contexts, build_contexts
from .logs import fields
from .table import Listener, Table, TableError

log = logging.getLogger("bilayer.dataplane")


class GenerationConflict(Exception):
    """A push older than the table being served; the pusher should move past `current`."""

    def __init__(self, pushed: int, current: int) -> None:
        super().__init__(
            f"generation {pushed} is not newer than the served generation {current}; "
            f"push with a generation above {current}"
        )
        self.current = current


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
    max_body_size: int = 0  # 0: no limit
    header_timeout: float = 10.0  # from a request's first byte to its last header (slowloris)
    keepalive_timeout: float = 60.0  # idle time between requests on a client connection
    connect_timeout: float = 5.0  # L7 connects to endpoints
    max_client_connections: int = 100_000  # per L7 listener; beyond it a fast 503
    via: bool = False  # add "Via: 1.1 bilayer" to forwarded requests


class Dataplane:
    """The table being served and its listeners."""

    def __init__(
        self, settings: Settings | None = None, factories: dict[str, ListenerFactory] | None = None
    ) -> None:
        self.settings = settings or Settings()
        self.factories = default_factories() if factories is None else factories
        self.table: Table | None = None
        self.listeners: dict[int, ServingListener] = {}
        self.listener_errors: dict[int, str] = {}
        self.health = HealthRegistry()
        # SSL contexts by port, built from the table before it is swapped in.
        self.tls_contexts: dict[int, Contexts] = {}
        self.tables_applied = 0
        self.tables_refused = 0
        self._lock = asyncio.Lock()
        self._draining: set[asyncio.Task[None]] = set()

    @property
    def ready(self) -> bool:
        return self.table is not None

    @property
    def state_file(self) -> Path | None:
        return self.settings.state_dir / "table.json" if self.settings.state_dir else None

    async def load_persisted(self) -> bool:
        """Serve the last good table from disk, if there is one; True when loaded."""
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

    async def apply(self, table: Table, *, persist: bool = True) -> bool:
        """Swap table in; False when it is the table already served (nothing changes).

        Raises GenerationConflict for a push older than the current table. The caller has
        validated the table (Table.parse); listeners that cannot bind are reported in
        listener_errors and the rest of the table is served.
        """
        table = table if table.version else table.stamped(table.generation)
        async with self._lock:
            current = self.table
            if current is not None and current.version == table.version:
                return False
            if current is not None and table.generation <= current.generation:
                self.tables_refused += 1
                raise GenerationConflict(table.generation, current.generation)
            self.tls_contexts = self._prepare_tls(table)
            await self._reconcile_listeners(table)
            self.health.retain(table)
            self.table = table
            self.tables_applied += 1
            if persist:
                self._persist(table)
        log.info(
            "table applied",
            extra=fields(
                version=table.version,
                generation=table.generation,
                listeners=sorted(table.listeners),
            ),
        )
        return True

    def _prepare_tls(self, table: Table) -> dict[int, Contexts]:
        """Load every certificate first: a bad one refuses the table, nothing changes."""
        contexts = {}
        for port, listener in table.listeners.items():
            if listener.l7 is not None and listener.l7.tls is not None:
                try:
                    contexts[port] = build_contexts(listener.l7.tls)
                except (ssl.SSLError, OSError, ValueError) as err:
                    self.tables_refused += 1
                    raise TableError(
                        f"listeners.{port}.l7.tls: certificate or key does not load: {err}"
                    ) from None
        return contexts

    async def _reconcile_listeners(self, table: Table) -> None:
        for port in sorted(set(self.listeners) - set(table.listeners)):
            self._retire(port)
        for port, listener in sorted(table.listeners.items()):
            kind = "l4" if listener.l4 is not None else "l7"
            running = self.listeners.get(port)
            if running is not None and running.kind == kind:
                running.update(listener, table)
                continue
            if running is not None:
                self._retire(port)
            await self._open(port, kind, listener, table)

    async def _open(self, port: int, kind: str, listener: Listener, table: Table) -> None:
        factory = self.factories.get(kind)
        if factory is None:
            self.listener_errors[port] = f"no {kind} listener support in this dataplane"
            return
        try:
            serving = await factory(self, port, listener, table)
        except OSError as err:
            self.listener_errors[port] = (
                f"cannot listen on {self.settings.address}:{port}: {err.strerror or err}"
            )
            log.error("listener failed", extra=fields(port=port, error=self.listener_errors[port]))
            return
        self.listener_errors.pop(port, None)
        self.listeners[port] = serving
        log.info("listener started", extra=fields(port=port, kind=kind))

    def _retire(self, port: int, grace: float | None = None) -> None:
        serving = self.listeners.pop(port)
        serving.stop_accepting()
        grace = self.settings.drain_grace if grace is None else grace
        task = asyncio.get_running_loop().create_task(serving.drain(grace))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)
        log.info(
            "listener removed; draining",
            extra=fields(port=port, connections=serving.active_connections, grace=grace),
        )

    def _persist(self, table: Table) -> None:
        path = self.state_file
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Atomic replace: a crash mid-write must never leave a torn table to load.
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".table-", suffix=".json")
            with os.fdopen(fd, "w") as out:  # mkstemp creates it 0600: the table holds TLS keys
                out.write(table.to_json())
            os.replace(tmp, path)
        except OSError as err:
            log.error("cannot save the table", extra=fields(path=str(path), error=str(err)))

    async def close(self, grace: float | None = None) -> None:
        """Stop every listener and drain connections for up to grace seconds."""
        for port in list(self.listeners):
            self._retire(port, grace)
        if self._draining:
            await asyncio.gather(*self._draining, return_exceptions=True)
        await self.health.close()


def default_factories() -> dict[str, ListenerFactory]:
    """The L4 and L7 listener implementations."""
    from .l4.listener import open_l4
    from .l7.listener import open_l7

    return {"l4": open_l4, "l7": open_l7}
