"""State the worker processes of a pod share in memory: rate-limit token buckets.

A route's rate limit of 100 requests a second is 100 for the pod, whichever worker a
client's connections land on. The supervisor creates one memory file (memfd) of
SLOTS buckets and hands it to every worker; a bucket is two doubles (tokens, last
refill, on time.monotonic: one clock for every process of the machine), found by a CRC
of the rule and the client key. Each take is a read and a write of 16 bytes without a
lock: two workers taking from one bucket in the same microsecond may both see the same
tokens, so a race admits at most one request more than the limit, and the next refill
corrects the count (a bucket holds no total that a lost write could skew for good). Two
keys on one slot (about one in 260,000 per pair of active keys) share a bucket.
The L4 and UDP listeners' connection rates (per client, per listener) take from the same
buckets. Outside workers (one process) nothing is shared: every limiter keeps its own.

Counts of open connections are not shared (a lost write would skew them for good): a
pod-wide cap is split evenly over the workers (share), exact while the kernel spreads
connections evenly over them.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib

SLOTS = 1 << 18  # 4 MiB: pages are only touched where buckets are used
BUCKET = struct.Struct("=dd")  # tokens, last refill (time.monotonic)

_buckets: SharedBuckets | None = None
_workers = 1


class SharedBuckets:
    """Token buckets in memory every worker maps."""

    def __init__(self, fd: int) -> None:
        self.memory = mmap.mmap(fd, SLOTS * BUCKET.size)

    @classmethod
    def create(cls) -> tuple[SharedBuckets, int]:
        """New zeroed buckets, and the descriptor a worker maps them from."""
        fd = os.memfd_create("bilayer-rate-limits", 0)  # no MFD_CLOEXEC: workers inherit it
        os.ftruncate(fd, SLOTS * BUCKET.size)
        return cls(fd), fd

    def take(self, rule: int, key: bytes, rate: float, burst: float, now: float) -> float:
        """0 when allowed; otherwise seconds until a token is available."""
        offset = zlib.crc32(key, rule) % SLOTS * BUCKET.size
        tokens: float
        last: float
        tokens, last = BUCKET.unpack_from(self.memory, offset)
        if last == 0.0:  # never used: a full bucket
            tokens, last = burst, now
        tokens = min(burst, tokens + max(0.0, now - last) * rate)
        if tokens >= 1.0:
            BUCKET.pack_into(self.memory, offset, tokens - 1.0, now)
            return 0.0
        BUCKET.pack_into(self.memory, offset, tokens, now)
        return (1.0 - tokens) / rate


def use(buckets: SharedBuckets | None, workers: int = 1) -> None:
    """Make this process one of workers, taking rate-limit tokens from buckets (a
    worker, at start)."""
    global _buckets, _workers
    _buckets, _workers = buckets, workers


def share(limit: int) -> int:
    """This worker's part of a pod-wide cap (an L4 listener's maxConnections): the cap
    split evenly, rounded up, so that the pod admits at most workers - 1 more than the cap
    and no worker refuses while it holds less than its share."""
    return -(-limit // _workers)


def buckets() -> SharedBuckets | None:
    """The pod's shared buckets in a worker; None in a dataplane of one process."""
    return _buckets
