"""Start and stop Azurite, the local Azure Storage emulator, for tests, the demo and the local host.

Azurite is the project's pinned npm dev dependency (`package.json`), installed by `make setup`.
It listens on free ports picked by the OS, so several can run side by side. The local host and
the demo keep their data in a store under `.local/` and, while Azurite serves it, write where it
listens into the store (`listening.json`), so `status` finds it, running or not.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
AZURITE_BIN = REPO_ROOT / "node_modules" / ".bin" / "azurite"
# Azurite's well-known development account; public, documented, not a secret.
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
HOST_STORE = REPO_ROOT / ".local" / "azurite"  # the local host's (`host --azurite`)
DEMO_STORE = REPO_ROOT / ".local" / "demo" / "azurite"  # the demo's, kept after it ends
LISTENING_FILE = "listening.json"
_LISTENING = re.compile(r"Azurite (Blob|Queue|Table) service is successfully listening at http://[^:]+:(\d+)")


class AzuriteError(RuntimeError):
    pass


@dataclass
class Azurite:
    process: subprocess.Popen[str]
    ports: dict[str, int]
    output: list[str] = field(default_factory=list)
    location: Path | None = None

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{self.ports['Blob']}/{ACCOUNT};"
            f"QueueEndpoint=http://127.0.0.1:{self.ports['Queue']}/{ACCOUNT};"
            f"TableEndpoint=http://127.0.0.1:{self.ports['Table']}/{ACCOUNT};"
        )

    def stop(self) -> None:
        if self.location is not None:
            (self.location / LISTENING_FILE).unlink(missing_ok=True)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_azurite(location: Path | None = None, timeout_s: float = 30.0) -> Azurite:
    """Start Azurite on free ports. With `location`, data persists there across restarts;
    without, it lives in memory and is gone when Azurite stops."""
    if not AZURITE_BIN.exists():
        raise AzuriteError(f"Azurite is not installed at {AZURITE_BIN}: run `make setup` (npm ci) first")
    if location is not None:
        location.mkdir(parents=True, exist_ok=True)
    persistence = ["--location", str(location)] if location else ["--inMemoryPersistence"]
    command = [
        str(AZURITE_BIN), "--silent", "--skipApiVersionCheck", "--disableTelemetry", "--loose",
        "--blobHost", "127.0.0.1", "--queueHost", "127.0.0.1", "--tableHost", "127.0.0.1",
        "--blobPort", "0", "--queuePort", "0", "--tablePort", "0", *persistence,
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    azurite = Azurite(process=process, ports={}, location=location)
    ready = threading.Event()

    def read_output() -> None:
        # Keeps draining Azurite's output for its whole life so its pipe never fills.
        assert process.stdout is not None
        for line in process.stdout:
            azurite.output.append(line.rstrip())
            match = _LISTENING.search(line)
            if match:
                azurite.ports[match.group(1)] = int(match.group(2))
                if len(azurite.ports) == 3:
                    ready.set()
        ready.set()

    threading.Thread(target=read_output, name="azurite-output", daemon=True).start()
    deadline = time.monotonic() + timeout_s
    try:
        while not ready.wait(0.1):
            if time.monotonic() > deadline:
                raise AzuriteError(f"Azurite did not start within {timeout_s:.0f} s: {' | '.join(azurite.output[-5:])}")
    except BaseException:  # not started in time, or the caller interrupted (Ctrl-C, SIGTERM): none left behind
        azurite.stop()
        raise
    if len(azurite.ports) != 3:
        azurite.stop()
        raise AzuriteError(f"Azurite exited during start-up: {' | '.join(azurite.output[-5:])}")
    if location is not None:
        (location / LISTENING_FILE).write_text(json.dumps({"connection_string": azurite.connection_string}))
    return azurite


def _listening(connection_string: str) -> bool:
    port = int(re.search(r"BlobEndpoint=http://127\.0\.0\.1:(\d+)/", connection_string).group(1))  # type: ignore[union-attr]
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def local_store(stores: tuple[Path, ...] = (HOST_STORE, DEMO_STORE)) -> Iterator[str | None]:
    """A connection string to the local host's or the demo's storage: the Azurite serving it now,
    or (nothing listening) one started on its data for as long as this lasts. The store used last
    wins; None when neither has any data."""
    existing = sorted((store for store in stores if store.is_dir()), key=lambda s: s.stat().st_mtime, reverse=True)
    for store in existing:
        listening = store / LISTENING_FILE
        if listening.exists():
            connection = json.loads(listening.read_text())["connection_string"]
            if _listening(connection):
                yield connection
                return
    if not existing:
        yield None
        return
    azurite = start_azurite(location=existing[0])
    try:
        yield azurite.connection_string
    finally:
        azurite.stop()
