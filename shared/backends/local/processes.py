"""What local jobs and endpoints share: detached processes, files written whole, locks across
processes, and waiting for a file another process is about to write."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[3]


def spawn(module: str, directory: Path, log_name: str) -> int:
    """Start `python -m module directory` in its own session (it outlives the caller, like a
    cloud job or endpoint), logging to `directory/log_name`; returns its pid."""
    with (directory / log_name).open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", module, str(directory)],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "TOKENIZERS_PARALLELISM": "false"},
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


def write_json(path: Path, payload: dict[str, Any], private: bool = False) -> None:
    """Readers see the old file or the new one, never half of one. `private`: a file holding a
    secret, readable by its owner only from the moment it exists."""
    staged = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # one per writer
    descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(descriptor, "w") as file:
        file.write(json.dumps(payload, indent=2))
    os.replace(staged, path)


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


def wait_for(path: Path, timeout_s: float = 30) -> bool:
    """Whether `path` appeared within the timeout."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
