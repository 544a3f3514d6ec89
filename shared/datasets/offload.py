"""A second thread for the work the GIL does not hold back (sha256, file writes), so preparation
parses on one core while hashing and writing happen on the other."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

_BLOCK_BYTES = 1 << 20
# Buffers one writev takes (POSIX guarantees 16; Linux takes 1024). Without writev (Windows), a
# block is joined and written whole.
_IOV_MAX = max(16, min(os.sysconf("SC_IOV_MAX"), 1024)) if hasattr(os, "sysconf") else 1024


class Offload:
    """Runs submitted calls in order on one background thread; bounded, so memory stays flat."""

    def __init__(self, depth: int = 4) -> None:
        self._queue: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="prepare-offload", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    item[0](*item[1])
                except BaseException as error:  # re-raised in the caller's thread by close()
                    self._error = error

    def submit(self, call: Callable[..., Any], *args: Any) -> None:
        self._queue.put((call, args))

    def close(self) -> None:
        """Wait for everything submitted; raise the first error any of it hit."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


class BlockWriter:
    """Collects lines and writes them to `path` in 1 MB blocks on the offload thread."""

    def __init__(self, path: Path, offload: Offload) -> None:
        self._file = path.open("wb", buffering=0)
        self._offload = offload
        self._parts: list[bytes] = []
        self._size = 0

    def write(self, line: bytes) -> None:
        self._parts.append(line)
        self._size += len(line)
        if self._size >= _BLOCK_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._parts:
            self._offload.submit(_write_all, self._file.fileno(), self._parts)
            self._parts, self._size = [], 0

    def close(self) -> None:
        self._flush()
        self._offload.submit(self._file.close)


def _write_all(fd: int, parts: list[bytes]) -> None:
    """Write `parts` in order with as few system calls as the OS takes buffers in one (writev),
    never joining them into one copy first."""
    for start in range(0, len(parts), _IOV_MAX):
        batch = parts[start : start + _IOV_MAX]
        written = os.writev(fd, batch) if hasattr(os, "writev") else 0
        if written < sum(map(len, batch)):  # a short write (a full disk says so on the next): the rest plainly
            rest = b"".join(batch)[written:]
            while rest:
                rest = rest[os.write(fd, rest) :]
