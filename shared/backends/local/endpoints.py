"""Local online endpoints, each a folder `<data dir>/endpoints/<name>/` (`endpoint.json`,
`keys.json` readable by the owner only, `ready.json` or `failed.json` from its server,
`last_request`), served by a process in `<data dir>/servers/<id>/` (`server.json`, `server.pid`,
`server.log`). Adapter-only models of one base share a server; any other model has its own.
Deploying an existing endpoint name returns it as it is."""

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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.backends.interface import BackendError
from shared.backends.local import served_model
from shared.backends.local.processes import file_lock, pid_alive, spawn, write_json

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


def _server_dir(data_dir: Path, server_id: str) -> Path:
    return data_dir / "servers" / server_id


def _server_pid(server_dir: Path) -> int | None:
    try:
        return int((server_dir / "server.pid").read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def _changing(data_dir: Path) -> Iterator[None]:
    """One deployer or deleter at a time, across processes: endpoints share servers."""
    with file_lock(data_dir / "endpoints" / ".lock"):
        yield


def _read(directory: Path) -> LocalEndpoint:
    spec = json.loads((directory / "endpoint.json").read_text())
    server = _server_dir(directory.parent.parent, spec["server"])
    ready = directory / "ready.json"
    alive = pid_alive(_server_pid(server))
    if (directory / "failed.json").exists() or (not alive and (server / "server.pid").exists()):
        state, port = "Failed", None
    else:
        port = json.loads(ready.read_text())["port"] if ready.exists() and alive else None
        state = "Succeeded" if port else "Creating"
    last = directory / "last_request"
    return LocalEndpoint(
        name=spec["name"],
        state=state,
        scoring_uri=f"http://127.0.0.1:{port}/score" if port else None,
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
    """Start serving `model` (name, version, MLflow model folder) at endpoint `name`; returns at once.
    An adapter-only model joins the server that holds its base, if one runs; anything else gets a
    server of its own."""
    directory = _directory(data_dir, name)
    model_name, model_version, model_path = model
    if not (model_path / "MLmodel").exists():
        raise EndpointError(f"{model_path} is not an MLflow model folder")
    with _changing(data_dir):
        if (directory / "endpoint.json").exists():
            if (found := _read(directory)).state != "Failed":
                return found
            _remove(data_dir, name)
        shutil.rmtree(directory, ignore_errors=True)  # a deployer that died before endpoint.json
        directory.mkdir()
        keys = {name: secrets.token_urlsafe(32) for name in ("primary_key", "secondary_key")}
        write_json(directory / "keys.json", keys, private=True)
        shared = served_model.is_adapter(model_path)
        server_id = f"base-{served_model.base_identity(model_path)}" if shared else f"model-{name}"
        spec = {
            "name": name,
            "model_name": model_name,
            "model_version": model_version,
            "model_path": str(model_path),
            "request_timeout_s": request_timeout_s,
            "created_at": datetime.now(UTC).isoformat(),
            "tags": tags,
            "server": server_id,
        }
        write_json(directory / "endpoint.json", spec)
        _ensure_server(_server_dir(data_dir, server_id), model_path)
        return _read(directory)


def _ensure_server(server: Path, model_path: Path) -> None:
    if pid_alive(_server_pid(server)):
        return  # it picks the new endpoint up from its folder
    shutil.rmtree(server, ignore_errors=True)
    server.mkdir(parents=True)
    write_json(server / "server.json", {"model_path": str(model_path)})
    (server / "server.pid").write_text(str(spawn("shared.backends.local.serve", server, "server.log")))


def log_path(data_dir: Path, name: str) -> Path:
    spec = json.loads((_directory(data_dir, name) / "endpoint.json").read_text())
    return _server_dir(data_dir, spec["server"]) / "server.log"


def wait_ready(data_dir: Path, name: str, timeout_s: float = 120) -> LocalEndpoint:
    deadline = time.monotonic() + timeout_s
    while (endpoint := get(data_dir, name)).state == "Creating" and time.monotonic() < deadline:
        time.sleep(0.2)
    if endpoint.state != "Succeeded":
        failed = _directory(data_dir, name) / "failed.json"
        if failed.exists():
            reason = json.loads(failed.read_text())["reason"]
        else:
            reason = log_path(data_dir, name).read_text()[-600:]
        raise EndpointError(f"endpoint {name} is {endpoint.state}: {reason}")
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
    """Remove the endpoint, and its server (freeing its port) once it serves no other endpoint.
    False if there was none."""
    with _changing(data_dir):
        return _remove(data_dir, name)


def _remove(data_dir: Path, name: str) -> bool:
    directory = _directory(data_dir, name)
    spec_file = directory / "endpoint.json"
    if not spec_file.exists():
        return False
    server_id = json.loads(spec_file.read_text())["server"]
    shutil.rmtree(directory, ignore_errors=True)
    if any(json.loads(other.read_text()).get("server") == server_id
           for other in (data_dir / "endpoints").glob("*/endpoint.json")):  # fmt: skip
        return True  # the server drops the endpoint's adapter when it sees the folder gone
    server = _server_dir(data_dir, server_id)
    pid = _server_pid(server)
    if pid_alive(pid):
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(server, ignore_errors=True)
    return True
