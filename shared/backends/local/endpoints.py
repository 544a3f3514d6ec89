"""Local online endpoints: one server process per endpoint, in `<data dir>/endpoints/<name>/`
(`endpoint.json`, `keys.json` readable by the owner only, `ready.json`, `last_request`,
`server.log`). Deploying an existing endpoint name returns it as it is."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.backends.interface import BackendError
from shared.backends.local.processes import pid_alive, spawn, wait_for, write_json

_ENDPOINT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]{1,30}[A-Za-z0-9]$")


class EndpointError(BackendError):
    """An endpoint request that cannot be carried out; the message says why."""


@dataclass(frozen=True)
class LocalEndpoint:
    name: str
    state: str  # Creating, Succeeded, Failed (Azure ML's provisioning states)
    scoring_uri: str | None
    model_name: str
    model_version: str
    created_at: str
    last_request_at: str | None
    tags: dict[str, str] = field(default_factory=dict)


def check_endpoint_name(name: str) -> str:
    if not _ENDPOINT_NAME.match(name):
        raise EndpointError(
            f"endpoint name {name!r}: 3-32 characters, starting with a letter, of letters, digits and hyphens, "
            "not ending with a hyphen"
        )
    return name


def _directory(data_dir: Path, name: str) -> Path:
    return data_dir / "endpoints" / check_endpoint_name(name)


def _read(directory: Path) -> LocalEndpoint:
    spec = json.loads((directory / "endpoint.json").read_text())
    ready = directory / "ready.json"
    port = json.loads(ready.read_text())["port"] if ready.exists() else None
    state = ("Succeeded" if port else "Creating") if pid_alive(spec["pid"]) else "Failed"
    last = directory / "last_request"
    return LocalEndpoint(
        name=spec["name"],
        state=state,
        scoring_uri=f"http://127.0.0.1:{port}/score" if port and state == "Succeeded" else None,
        model_name=spec["model_name"],
        model_version=spec["model_version"],
        created_at=spec["created_at"],
        last_request_at=last.read_text().strip() if last.exists() else None,
        tags=spec.get("tags", {}),
    )


def get(data_dir: Path, name: str) -> LocalEndpoint:
    directory = _directory(data_dir, name)
    if not (directory / "endpoint.json").exists():
        raise EndpointError(f"no endpoint {name!r}")
    return _read(directory)


def deploy(
    data_dir: Path,
    name: str,
    model: tuple[str, str, Path],
    tags: dict[str, str],
    request_timeout_s: int,
) -> LocalEndpoint:
    """Start serving `model` (name, version, MLflow model folder) at endpoint `name`; returns at once."""
    directory = _directory(data_dir, name)
    model_name, model_version, model_path = model
    if not (model_path / "MLmodel").exists():
        raise EndpointError(f"{model_path} is not an MLflow model folder")
    if (directory / "endpoint.json").exists() and _read(directory).state == "Failed":
        shutil.rmtree(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        directory.mkdir()  # the claim: of concurrent deployers, one creates the folder and starts the server
    except FileExistsError:
        if not wait_for(directory / "endpoint.json"):
            raise EndpointError(f"endpoint {name} is being created by another process that did not finish") from None
        return _read(directory)
    keys = directory / "keys.json"
    keys.touch(mode=0o600)
    keys.write_text(json.dumps({"primary_key": secrets.token_urlsafe(32), "secondary_key": secrets.token_urlsafe(32)}))
    pid = spawn("shared.backends.local.serve", directory, "server.log")
    spec = {
        "name": name,
        "model_name": model_name,
        "model_version": model_version,
        "model_path": str(model_path),
        "request_timeout_s": request_timeout_s,
        "created_at": datetime.now(UTC).isoformat(),
        "tags": tags,
        "pid": pid,
    }
    write_json(directory / "endpoint.json", spec)
    return _read(directory)


def wait_ready(data_dir: Path, name: str, timeout_s: float = 120) -> LocalEndpoint:
    deadline = time.monotonic() + timeout_s
    while (endpoint := get(data_dir, name)).state == "Creating" and time.monotonic() < deadline:
        time.sleep(0.2)
    if endpoint.state != "Succeeded":
        log_tail = (_directory(data_dir, name) / "server.log").read_text()[-600:]
        raise EndpointError(f"endpoint {name} is {endpoint.state}: {log_tail}")
    return endpoint


def keys(data_dir: Path, name: str) -> dict[str, str]:
    get(data_dir, name)
    return json.loads((_directory(data_dir, name) / "keys.json").read_text())


def list_endpoints(data_dir: Path) -> list[LocalEndpoint]:
    root = data_dir / "endpoints"
    found = sorted(root.glob("*/endpoint.json")) if root.exists() else []
    return [_read(path.parent) for path in found]


def invoke(
    data_dir: Path,
    name: str,
    body: dict[str, Any],
    route: str = "/score",
    key: str | None = None,
    timeout_s: float = 200,
) -> tuple[int, dict[str, Any]]:
    """POST `body` to the endpoint with its primary key (or `key`); returns (status, JSON reply)."""
    endpoint = get(data_dir, name)
    if endpoint.scoring_uri is None:
        raise EndpointError(f"endpoint {name} is {endpoint.state}, not ready for requests")
    url = endpoint.scoring_uri.removesuffix("/score") + route
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {key or keys(data_dir, name)['primary_key']}",
        },
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def delete(data_dir: Path, name: str) -> bool:
    """Stop the server (freeing its port) and remove the endpoint. False if there was none."""
    directory = _directory(data_dir, name)
    spec_file = directory / "endpoint.json"
    if not spec_file.exists():
        return False
    pid = json.loads(spec_file.read_text())["pid"]
    if pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(directory, ignore_errors=True)
    return True
