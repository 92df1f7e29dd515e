"""HTTP/2 frames seen from their heads, in front of python-hyper's h2.

h2 buffers a header block (HEADERS or PUSH_PROMISE, then CONTINUATION frames until
END_HEADERS) up to 64 frames, 1 MiB at the default frame size, and HPACK-decodes all of it
before it checks the size of the decoded list: a peer made the proxy hold that much and
spend ~0.2-0.3 s of CPU per MiB of Huffman code (CVE-2024-27316 is the unbounded form).
HeaderBlock counts a block's bytes as its frames' heads arrive, so that the connection is
refused once the block passes the head limit, before h2 has seen the bytes past it. Clients'
connections (h2server) and backends' (h2upstream) both count with it.
"""

from __future__ import annotations

FRAME_HEAD = 9
HEADERS = 1
PUSH_PROMISE = 5
GOAWAY = 7
CONTINUATION = 9
END_HEADERS = 0x4


class HeaderBlock:
    """The bytes of the header block being received, counted from its frames' heads."""

    __slots__ = ("began", "limit", "size")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0  # 0 between blocks
        self.began = 0.0  # when the block being received began (for its deadline)

    def frame(self, kind: int, flags: int, length: int, now: float) -> bool:
        """Count one frame by its head: False when it takes a header block over the limit."""
        if kind not in (HEADERS, CONTINUATION, PUSH_PROMISE):
            return True
        if not self.size:
            self.began = now
        self.size += length
        if self.size > self.limit:
            return False
        if flags & END_HEADERS:
            self.size = 0
        return True
