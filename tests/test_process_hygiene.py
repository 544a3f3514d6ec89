"""Every child process is reaped, and what was started is stopped on every way out."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from shared.backends.local.processes import spawn
from shared.dev import azurite as azurite_module


def test_a_spawned_process_is_reaped_when_it_ends(tmp_path: Path) -> None:
    pid = spawn("json.tool", tmp_path, "out.log")  # ends at once: a folder is no JSON file
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists():  # an ended child nobody waited for stays there, a zombie
        assert time.monotonic() < deadline, f"not reaped: {Path(f'/proc/{pid}/stat').read_text()}"
        time.sleep(0.05)


def test_azurite_interrupted_while_it_starts_is_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[subprocess.Popen[str]] = []
    real_popen = subprocess.Popen

    def recorded(*args: Any, **kwargs: Any) -> subprocess.Popen[str]:
        process = real_popen(*args, **kwargs)
        started.append(process)
        return process

    class InterruptedClock:
        """The clock of the start-up wait: Ctrl-C (or the host's SIGTERM) lands on its second look."""

        def __init__(self) -> None:
            self.looks = 0

        def monotonic(self) -> float:
            self.looks += 1
            if self.looks == 2:
                raise KeyboardInterrupt
            return time.monotonic()

    monkeypatch.setattr(azurite_module.subprocess, "Popen", recorded)
    monkeypatch.setattr(azurite_module, "time", InterruptedClock())
    with pytest.raises(KeyboardInterrupt):
        azurite_module.start_azurite(timeout_s=0)  # so the loop looks at the clock on its first pass
    (process,) = started
    assert process.poll() is not None  # stopped, not left serving
