"""Flow control for one direction of an exchange: reading from a transport pauses while any
reason holds (uvicorn's FlowControl, with reasons, so two causes never resume each other).

The client's transport pauses while a pipelined request waits, while a body has nowhere to
go yet, while the backend's socket is full, and while an upgrade waits for the 101. A
backend's transport pauses while the client's socket is full.
"""

from __future__ import annotations

import asyncio


class Flow:
    """Pause and resume reading from a transport; idempotent per reason."""

    __slots__ = ("reasons", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reasons: set[str] = set()

    @property
    def paused(self) -> bool:
        return bool(self.reasons)

    def pause(self, reason: str) -> None:
        if not self.reasons and self.transport is not None:
            self.transport.pause_reading()
        self.reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason not in self.reasons:
            return
        self.reasons.discard(reason)
        if not self.reasons and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def reset(self) -> None:
        """Read again whatever paused it (a connection going back to a pool)."""
        if self.reasons:
            self.reasons.clear()
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
