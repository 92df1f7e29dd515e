"""Endpoint health, shared by every listener that uses an endpoint.

Filled in by the L4 issue: active checks and passive ejection.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import Metric

from .table import Table


class HealthRegistry:
    """Health state per endpoint (address, port); kept across table swaps."""

    def retain(self, table: Table) -> None:
        """Forget endpoints the table no longer has."""

    async def close(self) -> None:
        """Stop active checks."""

    def collect(self) -> Iterator[Metric]:
        """Per-endpoint health metrics."""
        return iter(())
