"""kopf wiring, and nothing else: login, startup, one event handler per watched kind.

Handlers are `@kopf.on.event`: they keep no handler state on the objects (no
finalizers, no annotations), so the operator never writes to the resources it watches
except their status.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

import kopf

from .cluster import Operator, OperatorSettings
from .kube import Credentials, KubeClient
from .store import KINDS, Kind

log = logging.getLogger("bilayer.operator")

Login = Callable[..., Any]


def default_login(**kwargs: Any) -> Any:
    """In a pod: the service account; elsewhere: the kubeconfig."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def build_registry(
    settings: OperatorSettings, login: Login = default_login, state: dict[str, Any] | None = None
) -> tuple[kopf.OperatorRegistry, dict[str, Any]]:
    """A kopf registry for one operator; the returned dict holds the running Operator."""
    registry = kopf.OperatorRegistry()
    state = {} if state is None else state

    @kopf.on.login(registry=registry)
    def _login(**kwargs: Any) -> Any:
        return login(**kwargs)

    @kopf.on.startup(registry=registry)
    async def _startup(settings: kopf.OperatorSettings, **kwargs: Any) -> None:
        settings.posting.enabled = False  # our conditions say it all; no Event objects
        settings.scanning.disabled = True
        settings.watching.server_timeout = 300
        # kopf keeps a worker per object for idle_timeout after its last event (5 s by
        # default): the 11,000 status writes of a first start with 10,000 routes had
        # 11,000 workers alive at once. Our handlers are instant; workers may go sooner.
        settings.queueing.idle_timeout = 0.5
        # kopf runs startup before its own login: ask the same login function now.
        info = login(settings=settings, **kwargs)
        if info is None:
            raise kopf.PermanentError("no Kubernetes credentials: no service account and no kubeconfig")
        credentials = state["credentials"] = Credentials.of(info)
        operator = Operator(state["settings"], KubeClient(credentials))
        state["loop"] = asyncio.get_running_loop()
        state["operator"] = operator
        await operator.start()

    @kopf.on.cleanup(registry=registry)
    async def _cleanup(**_: Any) -> None:
        operator: Operator | None = state.get("operator")
        if operator is not None:
            await operator.stop()
            await operator.client.close()

    for kind in KINDS:
        _watch(registry, state, kind)

    state["settings"] = settings
    return registry, state


def _watch(registry: kopf.OperatorRegistry, state: dict[str, Any], kind: Kind) -> None:
    # async: kopf runs sync handlers in a thread pool, and the store and the loop's
    # events belong to the operator's event loop thread.
    @kopf.on.event(kind.group, kind.version, kind.plural, registry=registry)
    async def _event(type: str | None, body: kopf.Body, **_: Any) -> None:
        operator: Operator | None = state.get("operator")
        if operator is not None:
            operator.on_event(kind.kind, type, body)


async def run(
    settings: OperatorSettings,
    *,
    login: Login = default_login,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
    liveness: str | None = None,
    state: dict[str, Any] | None = None,
) -> None:
    """Run the operator until stop_flag is set (or forever); state receives the Operator."""
    # kopf logs every handled event at INFO: at 10,000 routes that is noise, not news.
    logging.getLogger("kopf").setLevel(logging.WARNING)
    registry, _ = build_registry(settings, login, state)
    namespaces = settings.watch_namespaces
    await kopf.operator(
        registry=registry,
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=True,  # the Lease decides who acts; both replicas keep a warm store
        stop_flag=stop_flag,
        ready_flag=ready_flag,
        liveness_endpoint=liveness,
    )
