"""Per-client limits that absorb floods at the edge, shared by TCP and UDP listeners.

What HAProxy users build with stick tables (``sc_conn_cur``, ``sc_conn_rate``): a count of
what each client holds open and a token bucket of what it may open, checked before any
backend is contacted, plus a token bucket for the whole listener. A client is an IPv4
address, or an IPv6 /64 (a host usually has a whole /64 to pick addresses from).

The state is bounded: a client holding nothing is kept only while its bucket is refilling
(after that it carries no information), and at most ``capacity`` such clients are kept
(the least recently seen go first). Clients holding connections are bounded by the
listener's connection or session cap.

With worker processes (dataplane.workers) the rates are the pod's: both buckets are taken
from the memory the workers share (dataplane.shared), so a client allowed 10 new
connections a second gets 10 from the pod, whichever worker the kernel hands each one to.
What a client holds open is counted by the worker holding it (a shared count that a
crashed worker left behind would refuse that client for good).
"""

from __future__ import annotations

import socket
import zlib
from collections import Counter, OrderedDict

from . import shared
from .table import Limits

IDLE_CLIENTS = 65536  # clients holding nothing whose rate state is kept, per listener
EXPIRE_PER_ADMIT = 4  # stale idle clients dropped per admission: memory follows the flood down


def client_key(address: str) -> str | bytes:
    """The client an address belongs to: the IPv4 address, or the IPv6 /64 prefix."""
    if ":" not in address:
        return address
    if address.startswith("::ffff:") and "." in address:
        return address[7:]  # an IPv4 client on a dual-stack socket
    try:
        return socket.inet_pton(socket.AF_INET6, address.partition("%")[0])[:8]
    except OSError:
        return address


class Client:
    """What one client holds and may still open."""

    __slots__ = ("active", "key", "stamp", "tokens")

    def __init__(self, key: str | bytes, tokens: float, now: float) -> None:
        self.key = key
        self.active = 0
        self.tokens = tokens
        self.stamp = now


class ClientLimiter:
    """Admits or refuses new connections (UDP: sessions) by client and for the listener."""

    def __init__(self, limits: Limits, capacity: int | None = None, *, scope: str = "") -> None:
        """scope names the listener (its protocol and port): in workers, its buckets are the
        ones every worker's limiter for that listener and these limits takes from."""
        self.limits = limits
        self.shared = shared.buckets()
        rates = f"{scope}#{limits.clientRate}#{limits.clientBurst}#{limits.acceptRate}#{limits.acceptBurst}"
        self.client_rule = zlib.crc32(f"client#{rates}".encode())
        self.accept_rule = zlib.crc32(f"accept#{rates}".encode())
        self.capacity = capacity if capacity is not None else IDLE_CLIENTS
        self.clients: dict[str | bytes, Client] = {}
        self.idle: OrderedDict[str | bytes, Client] = OrderedDict()  # active == 0, least recent first
        self.accept_tokens = float(limits.acceptBurst)
        self.accept_stamp = 0.0
        self.refused: Counter[str] = Counter()
        # A client holding nothing whose bucket has been refilling this long is full again.
        rate = limits.clientRate
        self.refill_seconds = limits.clientBurst / rate if rate else 0.0

    @property
    def tracked(self) -> int:
        return len(self.clients)

    def admit(self, address: str, now: float) -> Client | str:
        """The client's state, now holding one more; or why it is refused: accept_rate,
        client_connections or client_rate (counted in refused)."""
        limits = self.limits
        pod = self.shared
        if limits.acceptRate is not None and pod is not None:
            if pod.take(self.accept_rule, b"", limits.acceptRate, float(limits.acceptBurst), now) > 0.0:
                self.refused["accept_rate"] += 1
                return "accept_rate"
        elif limits.acceptRate is not None:
            tokens = min(
                float(limits.acceptBurst), self.accept_tokens + (now - self.accept_stamp) * limits.acceptRate
            )
            self.accept_stamp = now
            if tokens < 1.0:
                self.accept_tokens = tokens
                self.refused["accept_rate"] += 1
                return "accept_rate"
            self.accept_tokens = tokens - 1.0
        self._expire(now, EXPIRE_PER_ADMIT)
        key = client_key(address)
        client = self.clients.get(key)
        if client is None:
            client = self.clients[key] = Client(key, float(limits.clientBurst), now)
            self._rest(client)
        if limits.clientConnections is not None and client.active >= limits.clientConnections:
            self.refused["client_connections"] += 1
            return "client_connections"
        if limits.clientRate is not None and pod is not None:
            client.stamp = now  # (its bucket is the pod's; the stamp orders the idle clients)
            name = key if isinstance(key, bytes) else key.encode()
            if pod.take(self.client_rule, name, limits.clientRate, float(limits.clientBurst), now) > 0.0:
                if client.active == 0:
                    self.idle.move_to_end(key)
                self.refused["client_rate"] += 1
                return "client_rate"
        elif limits.clientRate is not None:
            tokens = min(float(limits.clientBurst), client.tokens + (now - client.stamp) * limits.clientRate)
            client.stamp = now
            if tokens < 1.0:
                client.tokens = tokens
                if client.active == 0:
                    self.idle.move_to_end(key)
                self.refused["client_rate"] += 1
                return "client_rate"
            client.tokens = tokens - 1.0
        if client.active == 0:
            del self.idle[key]
        client.active += 1
        return client

    def release(self, client: Client, now: float) -> None:
        """One of the client's connections (sessions) ended."""
        if self.clients.get(client.key) is not client:
            return  # counted by the limiter of an earlier table
        client.active -= 1
        if client.active > 0:
            return
        rate = self.limits.clientRate
        if rate is None:
            del self.clients[client.key]  # nothing to remember
            return
        # Restamped so that the idle clients stay in stamp order (see _expire).
        client.tokens = min(float(self.limits.clientBurst), client.tokens + (now - client.stamp) * rate)
        client.stamp = now
        self._rest(client)

    def _rest(self, client: Client) -> None:
        """Keep a client that holds nothing, within capacity."""
        self.idle[client.key] = client
        self.idle.move_to_end(client.key)
        while len(self.idle) > self.capacity:
            key, _ = self.idle.popitem(last=False)
            del self.clients[key]

    def expire(self, now: float) -> int:
        """Forget every client whose bucket is full again; how many were forgotten."""
        return self._expire(now, len(self.idle))

    def _expire(self, now: float, most: int) -> int:
        gone = 0
        idle = self.idle
        while idle and gone < most:
            key, client = next(iter(idle.items()))
            if now - client.stamp < self.refill_seconds:
                break  # the least recently seen is still refilling: so are the rest
            del idle[key]
            del self.clients[key]
            gone += 1
        return gone
