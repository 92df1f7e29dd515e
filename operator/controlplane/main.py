"""kopf wiring, and nothing else: login, startup, shutdown.

kopf runs the process: it asks the login handler for credentials, runs the startup
handler (which starts the Operator) and, on SIGTERM, the cleanup handler (which releases
the Lease). The watches are the Operator's own (controlplane.informer), not kopf's
handlers: kopf's watcher re-lists after 410 Gone without telling its handlers, so
objects deleted meanwhile could never be dropped, it cannot count restarts, and it
listed every Secret (with their data) where only kubernetes.io/tls ones matter.
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

log = logging.getLogger("bilayer.operator")

Login = Callable[..., Credentials | None]


def default_login(**_: Any) -> Credentials | None:
    """In a pod: the service account (its token file is re-read as the kubelet rotates
    it); elsewhere: the kubeconfig (`token`, `tokenFile` or client certificates)."""
    return Credentials.in_cluster() or Credentials.from_kubeconfig()


def connection_info(credentials: Credentials) -> kopf.ConnectionInfo:
    return kopf.ConnectionInfo(
        server=credentials.server,
        token=credentials.token,
        ca_path=credentials.ca_path,
        ca_data=credentials.ca_data,
        insecure=credentials.insecure,
        certificate_path=credentials.certificate_path,
        certificate_data=credentials.certificate_data,
        private_key_path=credentials.private_key_path,
        private_key_data=credentials.private_key_data,
        default_namespace=credentials.default_namespace,
        priority=100,
    )


def build_registry(
    settings: OperatorSettings, login: Login = default_login, state: dict[str, Any] | None = None
) -> tuple[kopf.OperatorRegistry, dict[str, Any]]:
    """A kopf registry for one operator; the returned dict holds the running Operator."""
    registry = kopf.OperatorRegistry()
    state = {} if state is None else state

    @kopf.on.login(registry=registry)
    def _login(**kwargs: Any) -> kopf.ConnectionInfo:
        credentials = login(**kwargs)
        if credentials is None:
            raise kopf.LoginError("no Kubernetes credentials: no service account and no kubeconfig")
        return connection_info(credentials)

    @kopf.on.startup(registry=registry)
    async def _startup(settings: kopf.OperatorSettings, **kwargs: Any) -> None:
        settings.posting.enabled = False  # our conditions say it all; no Event objects
        settings.scanning.disabled = True
        # kopf runs startup before its own login: ask the same login function now.
        credentials = login(settings=settings, **kwargs)
        if credentials is None:
            raise kopf.PermanentError("no Kubernetes credentials: no service account and no kubeconfig")
        operator_settings: OperatorSettings = state["settings"]
        client = KubeClient(credentials, qps=operator_settings.api_qps, burst=operator_settings.api_burst)
        operator = Operator(operator_settings, client)
        state["credentials"] = credentials
        state["loop"] = asyncio.get_running_loop()
        state["operator"] = operator
        try:
            await operator.start()
        except BaseException:
            # kopf runs a failed startup again (e.g. the health port is taken): this
            # attempt's tasks and connection pools must not outlive it.
            del state["operator"]
            await operator.stop()
            await client.close()
            raise

    @kopf.on.cleanup(registry=registry)
    async def _cleanup(**_: Any) -> None:
        operator: Operator | None = state.get("operator")
        if operator is not None:
            await operator.stop()
            await operator.client.close()

    state["settings"] = settings
    return registry, state


async def run(
    settings: OperatorSettings,
    *,
    login: Login = default_login,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
    state: dict[str, Any] | None = None,
) -> None:
    """Run the operator until stop_flag is set (or forever); state receives the Operator."""
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
        liveness_endpoint=None,  # ours: /healthz on the health port reflects our tasks
    )
