"""Preparing a dataset file on this machine (the command line's `prepare`) on two cores.

A plain JSON Lines file is cut at a line's start into two parts. A forked child process prepares
the first part, writing the outputs themselves; this process prepares the second into part files
appended to the outputs at the end, while a thread here hashes the whole file for the report
(hashlib lets go of the GIL, so the hash runs beside the parsing: this process takes the smaller
part to make up for it). The result is the one-piece preparation's, byte for byte: whenever the
second part could have been read differently after the first (a row the first part also holds,
an invalid row, another chat format, anything unreadable), the file is prepared again in one piece.
Uploads reaching the blob trigger stream from storage, one piece, and never come here.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import shutil
import signal
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from shared.datasets.formats import Converter
from shared.datasets.offload import BlockWriter, Offload
from shared.datasets.prepare import InputInfo, Preparation, Preparer, ReadInput, conclude, prepare_dataset, start
from shared.datasets.references import is_reference
from shared.datasets.sources import CHUNK_BYTES, UnreadableDataset, file_chunks, is_plain_jsonl, jsonl_part_rows
from shared.settings import DatasetSettings
from shared.vocabulary import REJECTED_FILE, TEST_FILE, TRAIN_FILE

# Below this size the second process costs more than it saves.
MIN_PARALLEL_BYTES = 32 << 20
# The first part's share of the file: the second part's process also hashes all of it.
FIRST_PART = 0.65
_OUTPUTS = (TRAIN_FILE, TEST_FILE, REJECTED_FILE)
_SECOND = ".second-part-"  # the second part's outputs, until appended


def prepare_file(
    path: Path,
    out_dir: Path,
    info: InputInfo,
    settings: DatasetSettings,
    metadata: Mapping[str, str] | None = None,
    on_progress: Callable[[int], None] | None = None,
    min_parallel_bytes: int = MIN_PARALLEL_BYTES,
) -> Preparation:
    """`prepare_dataset` for a file on this machine, in two parts on two cores when it can be."""
    if _splittable(path, info.name, min_parallel_bytes):
        prepared = _in_two_parts(path, out_dir, info, settings, metadata, on_progress)
        if prepared is not None:
            return prepared
    with path.open("rb") as data:
        return prepare_dataset(file_chunks(data), out_dir, info, settings, metadata, on_progress)


def _cores() -> int:
    """The cores this process may run on (all of the machine's where the OS cannot say)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def _splittable(path: Path, name: str, min_bytes: int) -> bool:
    if not hasattr(os, "fork") or _cores() < 2 or is_reference(name):
        return False
    with path.open("rb") as file:
        head = file.read(4)
        return os.fstat(file.fileno()).st_size >= min_bytes and is_plain_jsonl(head, name)


def _line_start(path: Path, offset: int) -> int:
    """The offset of the first line that starts at or after `offset`."""
    with path.open("rb") as file:
        file.seek(max(offset - 1, 0))
        if offset > 0:
            file.readline()  # the rest of the line `offset - 1` is in
        return file.tell()


class _Hasher(threading.Thread):
    """The whole file's sha256 and size, reporting progress as it goes."""

    def __init__(self, path: Path, on_progress: Callable[[int], None] | None) -> None:
        super().__init__(name="prepare-hash", daemon=True)
        self._path, self._on_progress = path, on_progress
        self.sha256, self.size = hashlib.sha256(), 0
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            buffer = bytearray(8 * CHUNK_BYTES)  # one buffer, read into again and again: no new pages
            with self._path.open("rb", buffering=0) as data, memoryview(buffer) as view:
                while read := data.readinto(buffer):
                    with view[:read] as chunk:
                        self.sha256.update(chunk)
                    self.size += read
                    if self._on_progress:
                        self._on_progress(self.size)
        except BaseException as error:  # raised in the preparing thread by `result`
            self.error = error

    def result(self) -> tuple[int, str]:
        """The file's size and sha256, once hashed."""
        self.join()
        if self.error is not None:
            raise self.error
        return self.size, self.sha256.hexdigest()


def _prepare_part(path: Path, start: int, end: int, outputs: list[Path], preparer: Preparer,
                  mapping: Mapping[str, str]) -> tuple[Preparer, str, int]:  # fmt: skip
    """Prepare bytes `start` to `end` of the file into `outputs` (train, test, rejected):
    (the preparer, the chat format found, the part's number of lines). Raises UnreadableDataset."""
    converter, lines = Converter(mapping), 0

    def rows() -> Any:
        nonlocal lines
        lines = yield from jsonl_part_rows(file, start, end)

    offload = Offload()
    writers = [BlockWriter(output, offload) for output in outputs]
    try:
        with path.open("rb") as file:
            preparer.run(map(converter.convert, rows()), *writers)
    finally:
        for writer in writers:
            writer.close()
        offload.close()
    return preparer, converter.format_name, lines


def _in_two_parts(
    path: Path,
    out_dir: Path,
    info: InputInfo,
    settings: DatasetSettings,
    metadata: Mapping[str, str] | None,
    on_progress: Callable[[int], None] | None,
) -> Preparation | None:
    """The preparation, or None when it must be done in one piece."""
    settings, training, mapping, refused = start(out_dir, metadata, settings)
    size = path.stat().st_size
    cut = _line_start(path, int(size * FIRST_PART))
    if refused or cut >= size:
        return None
    seconds = [out_dir / f"{_SECOND}{name}" for name in _OUTPUTS]
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's work is checked through the parent's result
        os.close(reader)
        outputs = [out_dir / name for name in _OUTPUTS]
        _first_part(writer, path, cut, outputs, Preparer(out_dir, info, settings, training), mapping)
    os.close(writer)
    pipe = os.fdopen(reader, "rb")
    hasher = _Hasher(path, on_progress)
    sent, exited = b"", False
    try:
        second: tuple[Preparer, str, int] | None = None
        with contextlib.suppress(UnreadableDataset):  # the one-piece preparation says why
            second = _prepare_part(path, cut, size, seconds, Preparer(out_dir, info, settings, training), mapping)
        sent = pipe.read()
        exited = True
    finally:
        pipe.close()  # first: a child still sending then stops, and so cannot block the wait
        if not exited:  # this process failed (or was interrupted): the child's work is not wanted
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        _, status = os.waitpid(child, 0)
        hashed = hasher.result()
        if not exited:
            for part in seconds:
                part.unlink(missing_ok=True)
    try:
        first = _received(sent, status)
        if first is None or second is None or not _same_reading(first, second):
            return None
        preparer, chat_format, lines = first
        preparer.absorb(second[0], lines)
        for output, part in zip(_OUTPUTS[:2], seconds, strict=False):
            _append(out_dir / output, part)
    finally:
        for part in seconds:
            part.unlink(missing_ok=True)
    read = ReadInput("jsonl", second[1] if chat_format == "unknown" else chat_format, Converter(mapping).mapping, None,
                     *hashed)  # fmt: skip
    return conclude(preparer, read, None, metadata)


def _first_part(pipe: int, path: Path, cut: int, outputs: list[Path], preparer: Preparer,
                mapping: Mapping[str, str]) -> None:  # fmt: skip
    """The child's work: prepare the first part, send the result through `pipe`, and end the
    process without running anything the parent set up for its own exit. Sends nothing when the
    part could not be prepared: the parent then prepares the file in one piece."""
    try:
        sent = pickle.dumps(_prepare_part(path, 0, cut, outputs, preparer, mapping))
    except BaseException:
        sent = b""
    try:
        with os.fdopen(pipe, "wb") as out:
            out.write(sent)
    finally:
        os._exit(0)


def _received(sent: bytes, status: int) -> tuple[Preparer, str, int] | None:
    """The child's result: None unless it ended well and sent all of it."""
    if not sent or not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        return None
    try:
        first: tuple[Preparer, str, int] = pickle.loads(sent)
    except Exception:  # cut short (the child was killed while sending)
        return None
    return first


def _same_reading(first: tuple[Preparer, str, int], second: tuple[Preparer, str, int]) -> bool:
    """Whether the second part reads as it would have after the first: no invalid row (its
    lines would be counted from the part), the first part's chat format if it found one, and no
    row whose prompt_id or messages the first part holds too (it would be a duplicate)."""
    earlier, later = first[0], second[0]
    if later.invalid or first[1] not in ("unknown", second[1]):
        return False
    return not any(key in earlier.seen_ids for key in later.seen_ids) and not any(
        key in earlier.seen_conversations for key in later.seen_conversations
    )


def _append(target: Path, part: Path) -> None:
    """Add `part` to the end of `target`, copied by the kernel where it can."""
    with part.open("rb") as source, target.open("r+b") as out:
        offset, remaining = out.seek(0, os.SEEK_END), os.fstat(source.fileno()).st_size
        with contextlib.suppress(OSError, AttributeError):  # Linux only, and not on every file system
            while remaining > 0:
                copied = os.copy_file_range(source.fileno(), out.fileno(), remaining, None, offset)
                if not copied:
                    break
                offset, remaining = offset + copied, remaining - copied
        if remaining:  # what the kernel did not copy, copied through this process
            source.seek(os.fstat(source.fileno()).st_size - remaining)
            out.seek(offset)
            shutil.copyfileobj(source, out, CHUNK_BYTES)
