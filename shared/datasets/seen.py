"""The conversations seen so far, in constant space per conversation: 64-bit hashes in an
open-addressing table in one array (about 16 bytes each), where a Python set of ints takes about
75 (measured on 400,000: 8 MB against 30 MB, 0.26 s against 0.10 s to fill)."""

from __future__ import annotations

from array import array
from collections.abc import Iterator

_MASK64 = (1 << 64) - 1


class SeenHashes:
    __slots__ = ("_count", "_mask", "_table", "_zero")

    def __init__(self, capacity: int = 1 << 16) -> None:
        self._table = array("Q", bytes(8 * capacity))  # capacity: a power of two; 0 marks a free slot
        self._mask = capacity - 1
        self._count = 0
        self._zero = False  # 0 cannot be stored where it marks a free slot

    def add(self, value: int) -> bool:
        """Remember `value` (a hash: a 64-bit signed integer); False when it was seen before."""
        key = value & _MASK64
        if not key:
            seen, self._zero = self._zero, True
            return not seen
        table, mask = self._table, self._mask
        slot = key & mask
        while True:
            found = table[slot]
            if found == key:
                return False
            if not found:
                break
            slot = (slot + 1) & mask
        table[slot] = key
        self._count += 1
        if 2 * self._count > mask:  # at most half full: probes stay short
            self._grow()
        return True

    def _grow(self) -> None:
        old = self._table
        self._table = table = array("Q", bytes(16 * len(old)))
        self._mask = mask = len(table) - 1
        for key in old:
            if key:
                slot = key & mask
                while table[slot]:
                    slot = (slot + 1) & mask
                table[slot] = key

    def __len__(self) -> int:
        return self._count + self._zero

    def __contains__(self, value: int) -> bool:
        key = value & _MASK64
        if not key:
            return self._zero
        table, mask = self._table, self._mask
        slot = key & mask
        while found := table[slot]:
            if found == key:
                return True
            slot = (slot + 1) & mask
        return False

    def __iter__(self) -> Iterator[int]:
        """The hashes remembered, as stored (unsigned), in no particular order."""
        if self._zero:
            yield 0
        yield from (key for key in self._table if key)
