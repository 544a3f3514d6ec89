"""Every child process is reaped, and what was started is stopped on every way out."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from shared.backends.local import endpoints
from shared.backends.local.processes import pid_alive, spawn
from shared.backends.local.settings import TINY_PHI3
from shared.backends.local.tiny_model import build_tiny_phi3
from shared.dev import azurite as azurite_module
from shared.dev.adapters import random_adapter_model
from tests.conftest import stop_local_processes


def test_a_spawned_process_is_reaped_when_it_ends(tmp_path: Path) -> None:
    pid = spawn("json.tool", tmp_path, "out")  # ends at once: a folder is no JSON file
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


class HandlerKilled(BaseException):
    """Stands for the process dying: nothing after it runs, nothing catches it."""


@pytest.mark.slow
def test_an_endpoint_deletion_cut_short_is_finished_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = build_tiny_phi3(tmp_path / TINY_PHI3)
    data = tmp_path / "local"
    endpoints.serve(data, "ep-cut", ("one", "1", random_adapter_model(base, tmp_path / "adapter", seed=1)), 30)
    server_pid = int(next(data.glob("servers/*/server.pid")).read_text())
    real = endpoints._remove_deployment

    def killed(*args: Any) -> None:
        raise HandlerKilled

    monkeypatch.setattr(endpoints, "_remove_deployment", killed)
    try:
        with pytest.raises(HandlerKilled):
            endpoints.delete(data, "ep-cut")  # the endpoint is gone for readers, its server still runs
        with pytest.raises(endpoints.EndpointError, match="no endpoint 'ep-cut'"):
            endpoints.get(data, "ep-cut")
        assert pid_alive(server_pid)
        monkeypatch.setattr(endpoints, "_remove_deployment", real)
        assert endpoints.delete(data, "ep-cut")  # redone: it finishes the job
        assert not (data / "endpoints" / "ep-cut").exists()
        assert not pid_alive(server_pid) and not list(data.glob("servers/*"))
    finally:
        stop_local_processes(data)
