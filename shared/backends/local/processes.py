"""What local jobs and endpoints share: detached processes that say by a lock whether they run,
files written whole, and locks across processes."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[3]
LOCK_FD_VARIABLE = "LOCAL_PROCESS_LOCK_FD"  # tells a process `spawn` started which descriptor holds its lock


def spawn(module: str, directory: Path, role: str) -> int:
    """Start `python -m module directory` in its own session (it outlives the caller, like a
    cloud job or endpoint), logging to `directory/<role>.log`; returns its pid.

    Whether it runs is told by `<role>.lock`, not by a pid: the lock is taken here and handed to
    the process, so it is held from before the process exists until its last instruction, and
    freed by its end however it ends. A starter killed the instant after starting it leaves a
    process that every later look finds running, never a second one started beside it. The
    process writes `<role>.pid` itself, first thing (see `detached`)."""
    if running(directory, role):  # callers decide under a lock of theirs whether to start one
        raise RuntimeError(f"{directory}: its {role} runs already")
    # The last one's pid file goes first: until the new process writes its own, it has not
    # `started`, so a starter killed before starting it leaves it to be started again.
    (directory / f"{role}.pid").unlink(missing_ok=True)
    staged = directory / f".{role}.lock.{os.getpid()}.{threading.get_ident()}"
    with staged.open("w") as lock, (directory / f"{role}.log").open("ab") as log:
        fcntl.flock(lock, fcntl.LOCK_EX)  # locked before it is in place: never found there and free
        os.replace(staged, directory / f"{role}.lock")
        process = subprocess.Popen(
            [sys.executable, "-m", "shared.backends.local.detached", role, module, str(directory)],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=(lock.fileno(),),  # the same open file: the lock goes with it
            env={
                **os.environ,
                "PYTHONPATH": str(REPO_ROOT),
                "TOKENIZERS_PARALLELISM": "false",
                LOCK_FD_VARIABLE: str(lock.fileno()),
            },
        )
    # Reaped the moment it ends, so a caller that lives on (the host, a test) keeps no zombie of
    # it; a caller that ends first leaves that to init.
    threading.Thread(target=process.wait, name=f"reap-{process.pid}", daemon=True).start()
    return process.pid


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


_held_lock: list[int] = []  # in a process `spawn` started: the descriptor of its lock


def hold_lock() -> None:
    """In a process `spawn` started: keep its lock to itself. Nothing it starts inherits the
    descriptor or learns its number, so no child of it can keep it running after it ended."""
    descriptor = os.environ.pop(LOCK_FD_VARIABLE, None)
    if descriptor is not None:
        os.set_inheritable(int(descriptor), False)
        _held_lock.append(int(descriptor))


def release() -> None:
    """For a process `spawn` started: give up its lock before it ends, so that a new one can be
    started while this one finishes leaving."""
    while _held_lock:
        os.close(_held_lock.pop())


def started(directory: Path, role: str) -> bool:
    """Whether the role's process `spawn` started in `directory` ever ran (it writes its pid
    before anything else); with `running`, whether it ended."""
    return (directory / f"{role}.pid").exists()


def running(directory: Path, role: str, recorded_pid: int | None = None) -> bool:
    """Whether the process `spawn` started for this role in `directory` still runs. One started
    by a version before the locks has no lock file: its pid (its pid file's, or `recorded_pid`)
    is all there is to judge by."""
    try:
        descriptor = os.open(directory / f"{role}.lock", os.O_RDONLY)
    except FileNotFoundError:
        return pid_alive(pid_of(directory, role) or recorded_pid)
    try:  # shared: two looks at once do not take each other for the process
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)  # releases the lock if this look took it
    return False


def pid_of(directory: Path, role: str, wait_s: float = 0) -> int | None:
    """The pid of the role's process, waiting up to `wait_s` for one just started to write it."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return int((directory / f"{role}.pid").read_text())
        except (OSError, ValueError):
            if time.monotonic() >= deadline:
                return None
        time.sleep(0.05)


def _runs_in(pid: int, directory: Path) -> bool:
    """Whether process `pid` was started for `directory` (where /proc tells)."""
    try:
        return str(directory).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # no /proc here: the pid is all there is
    except OSError:
        return True


def stop(directory: Path, role: str, grace_s: float = 15) -> None:
    """Stop the role's process if it runs: SIGTERM, then SIGKILL after `grace_s`."""
    if not running(directory, role):
        return
    pid = pid_of(directory, role, wait_s=10)
    if pid is None or not _runs_in(pid, directory):  # ended before it said who it is, or the pid is another's now
        return
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while running(directory, role) and time.monotonic() < deadline:
            time.sleep(0.1)
        if running(directory, role):
            os.kill(pid, signal.SIGKILL)


def write_whole(path: Path, text: str, private: bool = False) -> None:
    """Readers see the old file or the new one, never half of one. `private`: a file holding a
    secret, readable by its owner only from the moment it exists."""
    staged = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # one per writer
    descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
    os.replace(staged, path)


def write_json(path: Path, payload: dict[str, Any], private: bool = False) -> None:
    write_whole(path, json.dumps(payload, indent=2), private)


def read_json(path: Path) -> Any:
    """A file `write_json` wrote, or None while there is none (not yet, or just removed)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold `path` as an exclusive lock across processes (released if the holder dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
