"""`bilayer dataplane`: a dataplane pod, programmed by the operator through its admin API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine
from typing import Any

from .admin import build_app, build_metrics_app, is_loopback, serve
from .logs import fields
from .runtime import Dataplane, Settings

log = logging.getLogger("bilayer.dataplane")


def require_token(admin_host: str, token: str | None) -> None:
    """Refuse to serve an admin API off loopback without a token."""
    if token is None and not is_loopback(admin_host):
        raise SystemExit(
            f"the admin API on {admin_host} needs a token: set BILAYER_ADMIN_TOKEN or --admin-token-file, "
            "or bind it to 127.0.0.1"
        )


async def open_dataplane(settings: Settings) -> Dataplane:
    """The dataplane settings ask for: this process (one worker), or a supervisor of
    settings.workers worker processes, all of them started."""
    dataplane = new_dataplane(settings)
    await start_workers(dataplane)
    return dataplane


def new_dataplane(settings: Settings) -> Dataplane:
    """This process's dataplane (one worker), or a supervisor of settings.workers worker
    processes, not started yet (start_workers)."""
    if settings.workers <= 1:
        return Dataplane(settings)
    from .workers import WorkerPool

    level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
    return WorkerPool(
        settings,
        settings.workers,
        sockets=settings.worker_sockets,
        apply_timeout=settings.worker_apply_timeout,
        log_level=level,
    )


async def start_workers(dataplane: Dataplane, *, close_on_failure: bool = True) -> None:
    """Start a supervisor's workers and wait until each is up; nothing for one process."""
    from .workers import WorkerPool

    if not isinstance(dataplane, WorkerPool):
        return
    try:
        await dataplane.start()
    except BaseException:
        if close_on_failure:
            await dataplane.close(0)
        raise
    log.info("workers started", extra=fields(workers=dataplane.count, sockets=dataplane.socket_mode))


def stop_on_signals(stop: asyncio.Event | None) -> asyncio.Event:
    """An event set by SIGINT or SIGTERM (and by whoever holds it)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop


async def run_dataplane(
    settings: Settings,
    admin_host: str,
    admin_port: int,
    token: str | None,
    stop: asyncio.Event | None = None,
    *,
    metrics_port: int | None = None,
) -> None:
    """Serve until stop is set or SIGTERM; the saved table, if any, is served at once.

    With metrics_port, /metrics, /healthz and /readyz are also served there, on the admin
    address and without the token.
    """
    require_token(admin_host, token)
    stop = stop_on_signals(stop)  # before the workers start: SIGTERM then stops them too
    dataplane = new_dataplane(settings)
    # Probes have their answers while workers start (seconds on a busy node): /healthz is
    # ok, /readyz waits for the table, a push before the workers are up gets a 503.
    runners = [await serve(build_app(dataplane, token), admin_host, admin_port)]
    if metrics_port:
        runners.append(await serve(build_metrics_app(dataplane), admin_host, metrics_port))
    try:
        if await _until_stopped(_start(dataplane, admin_host, admin_port, metrics_port), stop):
            await stop.wait()
    finally:
        log.info("shutting down", extra=fields(grace=settings.drain_grace))
        await dataplane.close()
        for runner in runners:
            await runner.cleanup()


async def _start(dataplane: Dataplane, admin_host: str, admin_port: int, metrics_port: int | None) -> None:
    await start_workers(dataplane, close_on_failure=False)
    await dataplane.load_persisted()
    log.info(
        "dataplane started",
        extra=fields(
            admin=f"{admin_host}:{admin_port}",
            metrics=f"{admin_host}:{metrics_port}" if metrics_port else None,
            ready=dataplane.ready,
        ),
    )


async def _until_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
    """Run work unless stop comes first (then cancel it); True when work finished."""
    task = asyncio.create_task(work)
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return False
    task.result()  # its exception, if it failed
    return True
