"""Byte bookkeeping for a proxy that forwards a stream unchanged except for whole messages.

The PostgreSQL filter forwards what it receives as it receives it, but must sometimes *hold*
bytes (an incomplete Query whose verdict is not known yet), *drop* a message (a denied
Parse), or *replace* one (a denied Query becomes a statement that raises the error on the
server). :class:`Splicer` keeps the received chunks that are not yet accounted for and, given
absolute stream offsets from the decoder (``ends``), writes or drops ranges of them. When a
chunk is forwarded whole, the very ``bytes`` object the loop handed in is written: the common
path copies nothing.
"""

from __future__ import annotations

from collections.abc import Callable


class Splicer:
    """Chunks covering stream offsets ``[start, received)``; ``start`` only moves forward."""

    __slots__ = ("_drop_until", "_held", "_held_at", "received", "start", "write")

    def __init__(self, write: Callable[[bytes], object]) -> None:
        self.write = write
        self._held: list[bytes] = []
        self._held_at = 0  # stream offset of _held[0][0]
        self.start = 0  # everything before this offset was written or dropped
        self.received = 0
        self._drop_until = 0  # a dropped message's body may arrive later: drop it then

    @property
    def pending(self) -> int:
        """Bytes received and not yet written or dropped."""
        return self.received - self.start

    def add(self, data: bytes) -> None:
        if not self._held:
            self._held_at = self.received
        self._held.append(data)
        self.received += len(data)

    def forward_to(self, end: int) -> None:
        """Write what lies between ``start`` and ``end`` (clamped to what has arrived)."""
        if self._drop_until > self.start:
            self.drop_to(self._drop_until)
        end = min(end, self.received)
        if end <= self.start:
            return
        held = self._held
        if len(held) == 1 and self.start == self._held_at and end == self.received:
            self.write(held[0])  # the common case: one chunk, forwarded as it came
            held.clear()
            self.start = end
            return
        self._take(end, write=True)

    def drop_to(self, end: int) -> None:
        """Discard what lies between ``start`` and ``end``; bytes up to ``end`` that have not
        arrived yet are discarded when they do."""
        self._drop_until = max(self._drop_until, end)
        end = min(end, self.received)
        if end > self.start:
            self._take(end, write=False)

    def skip(self, n: int) -> None:
        """``n`` bytes went past without being held (nothing may be held)."""
        assert not self._held
        self.received += n
        self.start = self._held_at = self.received

    def forward_all(self) -> None:
        self.forward_to(self.received)

    def _take(self, end: int, *, write: bool) -> None:
        held = self._held
        pieces: list[bytes] = []
        while held and self.start < end:
            chunk = held[0]
            lo = self.start - self._held_at
            hi = min(len(chunk), end - self._held_at)
            if write:
                pieces.append(chunk[lo:hi] if (lo, hi) != (0, len(chunk)) else chunk)
            self.start = self._held_at + hi
            if hi == len(chunk):
                held.pop(0)
                self._held_at += len(chunk)
        if pieces:
            self.write(pieces[0] if len(pieces) == 1 else b"".join(pieces))
