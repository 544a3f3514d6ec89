"""Local online endpoints, laid out as Azure ML's managed ones: an endpoint is a URL with keys and
a traffic split over its deployments, each deployment a model version.

On disk, under the data folder:
- `endpoints/<name>/`: `endpoint.json`, `keys.json` (readable by the owner only), `traffic.json`
  (deployment -> percent), `last_request` (written by the gateway), `deleting` (while it is
  deleted, so that a deletion cut short is finished by the next);
- `endpoints/<name>/deployments/<deployment>/`: `deployment.json`, `keys.json` (the key the gateway
  uses), `ready.json` or `failed.json` from its server, `last_request`;
- `servers/<id>/` (`server.json`, `server.lock`, `server.pid`, `server.log`): a process holding
  one model; adapter-only models of one base share a server, any other model has its own;
- `gateway/` (`gateway.json`, `gateway.lock`, `gateway.pid`, `gateway.log`): the one front door
  of every endpoint.
A process runs while its `.lock` is held (see `processes.spawn`).
Changes take a file lock; deploying what exists returns it as it is."""

from __future__ import annotations

import json
import secrets
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.backends.interface import BackendError
from shared.backends.local import served_model
from shared.backends.local.processes import file_lock, pid_of, read_json, running, spawn, started, stop, write_json
from shared.validation import RESOURCE_NAME, resource_name
from shared.vocabulary import DEPLOYMENT_HEADER

_DELETING = "deleting"


class EndpointError(BackendError):
    """An endpoint request that cannot be carried out; the message says why."""


@dataclass(frozen=True)
class LocalDeployment:
    name: str
    state: str  # Creating, Succeeded, Failed (Azure ML's provisioning states)
    model_name: str
    model_version: str
    reason: str | None = None  # why it failed


@dataclass(frozen=True)
class LocalEndpoint:
    name: str
    state: str  # Creating (its gateway is starting), Succeeded
    scoring_uri: str | None
    created_at: str
    last_request_at: str | None
    tags: dict[str, str] = field(default_factory=dict)
    traffic: dict[str, int] = field(default_factory=dict)
    deployments: tuple[LocalDeployment, ...] = ()


def check_name(name: str, what: str = "endpoint") -> str:
    try:
        return resource_name(name)
    except ValueError:
        raise EndpointError(f"{what} name {name!r}: {RESOURCE_NAME.expects}") from None


def _directory(data_dir: Path, name: str) -> Path:
    return data_dir / "endpoints" / check_name(name)


def _deployment_dir(data_dir: Path, endpoint: str, deployment: str) -> Path:
    return _directory(data_dir, endpoint) / "deployments" / check_name(deployment, "deployment")


@contextmanager
def _changing(data_dir: Path) -> Iterator[None]:
    """One deployer or deleter at a time, across processes: endpoints share servers and a gateway."""
    with file_lock(data_dir / "endpoints" / ".lock"):
        yield


def gateway_port(data_dir: Path) -> int | None:
    """The port of the running gateway, None while it is not up."""
    gateway = data_dir / "gateway"
    listening = read_json(gateway / "gateway.json") or {}
    pid = pid_of(gateway, "gateway")
    return listening.get("port") if pid and listening.get("pid") == pid and running(gateway, "gateway") else None


def _ensure_gateway(data_dir: Path) -> None:
    gateway = data_dir / "gateway"
    gateway.mkdir(parents=True, exist_ok=True)
    if not running(gateway, "gateway"):
        spawn("shared.backends.local.gateway", gateway, "gateway")


def _read_deployment(folder: Path) -> LocalDeployment:
    spec = json.loads((folder / "deployment.json").read_text())
    server = folder.parents[3] / "servers" / spec["server"]
    failed = read_json(folder / "failed.json")
    if failed is None and started(server, "server") and not running(server, "server"):
        failed = {"reason": f"its server stopped: {_tail(server / 'server.log')}"}
    state = "Failed" if failed else "Succeeded" if (folder / "ready.json").exists() else "Creating"
    return LocalDeployment(spec["name"], state, spec["model_name"], spec["model_version"],
                           failed["reason"] if failed else None)  # fmt: skip


def _tail(log: Path) -> str:
    try:
        return " ".join(log.read_text()[-600:].split())
    except OSError:
        return "no log"


def _read(directory: Path) -> LocalEndpoint:
    spec = json.loads((directory / "endpoint.json").read_text())
    port = gateway_port(directory.parent.parent)
    last = directory / "last_request"
    deployments = tuple(_read_deployment(found.parent)
                        for found in sorted(directory.glob("deployments/*/deployment.json")))  # fmt: skip
    return LocalEndpoint(
        name=spec["name"],
        state="Succeeded" if port else "Creating",
        scoring_uri=f"http://127.0.0.1:{port}/score" if port else None,
        created_at=spec["created_at"],
        last_request_at=last.read_text().strip() if last.exists() else None,
        tags=spec.get("tags", {}),
        traffic=read_json(directory / "traffic.json") or {},
        deployments=deployments,
    )


def _gateway_up(data_dir: Path) -> None:
    """Endpoints outlive their gateway (a reboot, a kill): the first look at them starts it again,
    on its last port if that is free."""
    if gateway_port(data_dir) is None:
        with _changing(data_dir):
            _ensure_gateway(data_dir)


def _existing(data_dir: Path, name: str) -> Path:
    directory = _directory(data_dir, name)
    if not (directory / "endpoint.json").exists():
        raise EndpointError(f"no endpoint {name!r}")
    return directory


def get(data_dir: Path, name: str) -> LocalEndpoint:
    directory = _existing(data_dir, name)
    _gateway_up(data_dir)
    return _read(directory)


def deployment(data_dir: Path, endpoint: str, name: str) -> LocalDeployment:
    folder = _deployment_dir(data_dir, endpoint, name)
    if not (folder / "deployment.json").exists():
        raise EndpointError(f"endpoint {endpoint} has no deployment {name!r}")
    return _read_deployment(folder)


def deploy(
    data_dir: Path,
    endpoint: str,
    name: str,
    model: tuple[str, str, Path],
    tags: dict[str, str],
    request_timeout_s: int,
) -> None:
    """Start deployment `name` of `endpoint` serving `model` (name, version, MLflow model folder)
    at 0% traffic, creating the endpoint (with `tags`, its keys and no traffic) if it is new;
    returns at once. An adapter-only model joins the server that holds its base, if one runs;
    anything else gets a server of its own."""
    directory, folder = _directory(data_dir, endpoint), _deployment_dir(data_dir, endpoint, name)
    model_name, model_version, model_path = model
    if not (model_path / "MLmodel").exists():
        raise EndpointError(f"{model_path} is not an MLflow model folder")
    with _changing(data_dir):
        if not (directory / "endpoint.json").exists():
            if (directory / _DELETING).exists():  # a deletion cut short: its servers stopped first
                _finish_deleting(data_dir, directory)
            shutil.rmtree(directory, ignore_errors=True)  # a deployer that died before endpoint.json
            directory.mkdir(parents=True)
            keys = {key: secrets.token_urlsafe(32) for key in ("primary_key", "secondary_key")}
            write_json(directory / "keys.json", keys, private=True)
            write_json(directory / "traffic.json", {})
            created = datetime.now(UTC).isoformat()
            write_json(directory / "endpoint.json", {"name": endpoint, "created_at": created, "tags": tags})
        _ensure_gateway(data_dir)
        if (folder / "deployment.json").exists():
            if _read_deployment(folder).state != "Failed":  # its deployer may have died before starting its server
                _ensure_server(data_dir / "servers" / json.loads((folder / "deployment.json").read_text())["server"],
                               model_path)  # fmt: skip
                return
            _remove_deployment(data_dir, folder)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        write_json(folder / "keys.json", {"key": secrets.token_urlsafe(32)}, private=True)
        shared = served_model.is_adapter(model_path)
        server_id = f"base-{served_model.base_identity(model_path)}" if shared else f"model-{endpoint}-{name}"
        spec = {
            "endpoint": endpoint,
            "name": name,
            "model_name": model_name,
            "model_version": model_version,
            "model_path": str(model_path),
            "request_timeout_s": request_timeout_s,
            "created_at": datetime.now(UTC).isoformat(),
            "tags": tags,
            "server": server_id,
        }
        write_json(folder / "deployment.json", spec)
        _ensure_server(data_dir / "servers" / server_id, model_path)


def _ensure_server(server: Path, model_path: Path) -> None:
    if running(server, "server"):
        return  # it picks the new deployment up from its folder
    shutil.rmtree(server, ignore_errors=True)
    server.mkdir(parents=True)
    write_json(server / "server.json", {"model_path": str(model_path)})
    spawn("shared.backends.local.serve", server, "server")


def log_path(data_dir: Path, endpoint: str, name: str) -> Path:
    spec = json.loads((_deployment_dir(data_dir, endpoint, name) / "deployment.json").read_text())
    return data_dir / "servers" / spec["server"] / "server.log"


def wait_ready(data_dir: Path, endpoint: str, name: str, timeout_s: float = 120) -> LocalDeployment:
    """The deployment once it serves (and the gateway in front of it is up), or an EndpointError
    saying why it does not."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = deployment(data_dir, endpoint, name)
        up = gateway_port(data_dir) is not None
        if not up:  # one that left as this deployment came (it saw no endpoint) is started again
            _gateway_up(data_dir)
        if found.state == "Failed" or (found.state == "Succeeded" and up) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if found.state == "Failed":
        raise EndpointError(f"deployment {name} of endpoint {endpoint} failed: {found.reason}")
    if found.state != "Succeeded" or not up:
        waiting = "its model to load" if found.state != "Succeeded" else "the endpoints' gateway"
        raise EndpointError(f"deployment {name} of endpoint {endpoint} is still waiting for {waiting} "
                            f"after {timeout_s:.0f} s: {_tail(log_path(data_dir, endpoint, name))}")  # fmt: skip
    return found


def serve(data_dir: Path, endpoint: str, model: tuple[str, str, Path], request_timeout_s: int = 90,
          deployment: str = "main", timeout_s: float = 120) -> LocalEndpoint:  # fmt: skip
    """Deploy `model` as `deployment` of `endpoint`, wait for it, and give it all the traffic."""
    deploy(data_dir, endpoint, deployment, model, {}, request_timeout_s)
    wait_ready(data_dir, endpoint, deployment, timeout_s)
    set_traffic(data_dir, endpoint, {deployment: 100})
    return get(data_dir, endpoint)


def set_traffic(data_dir: Path, endpoint: str, split: Mapping[str, int]) -> None:
    """As Azure ML takes it: shares of existing deployments, summing to 100 (or all 0)."""
    with _changing(data_dir):
        # Its deployments' names from their folders: get() would start a gateway that is down,
        # which takes this same lock.
        directory = _existing(data_dir, endpoint)
        names = {spec.parent.name for spec in directory.glob("deployments/*/deployment.json")}
        unknown = sorted(set(split) - names)
        if unknown:
            raise EndpointError(f"endpoint {endpoint} has no deployment {', '.join(unknown)}")
        if any(share < 0 for share in split.values()) or sum(split.values()) not in (0, 100):
            raise EndpointError(f"traffic of endpoint {endpoint} must add up to 100: {dict(split)}")
        write_json(directory / "traffic.json", {name: split.get(name, 0) for name in sorted(names)})


def keys(data_dir: Path, name: str) -> dict[str, str]:
    get(data_dir, name)
    return json.loads((_directory(data_dir, name) / "keys.json").read_text())


def list_endpoints(data_dir: Path) -> list[LocalEndpoint]:
    root = data_dir / "endpoints"
    found = sorted(root.glob("*/endpoint.json")) if root.exists() else []
    if found:
        _gateway_up(data_dir)
    return [_read(path.parent) for path in found]


def invoke(
    data_dir: Path,
    name: str,
    body: dict[str, Any],
    route: str = "/score",
    key: str | None = None,
    timeout_s: float = 200,
    deployment: str | None = None,
) -> tuple[int, dict[str, Any]]:
    """POST `body` to the endpoint with its primary key (or `key`), to `deployment` if given;
    returns (status, JSON reply)."""
    endpoint = get(data_dir, name)
    if endpoint.scoring_uri is None:
        raise EndpointError(f"endpoint {name} is {endpoint.state}, not ready for requests")
    headers = {
        "Content-Type": "application/json",
        "Authorization": f"Bearer {key or keys(data_dir, name)['primary_key']}",
    }
    if deployment:
        headers[DEPLOYMENT_HEADER] = deployment
    url = endpoint.scoring_uri.removesuffix("/score") + route
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def delete_deployment(data_dir: Path, endpoint: str, name: str) -> bool:
    """Remove one deployment (refused while it takes traffic, as on Azure ML), and its server once
    that serves nothing else. False if there was none."""
    folder = _deployment_dir(data_dir, endpoint, name)
    with _changing(data_dir):
        if not (folder / "deployment.json").exists():
            return False
        traffic_file = folder.parents[1] / "traffic.json"
        traffic = read_json(traffic_file) or {}
        if traffic.get(name, 0) > 0:
            raise EndpointError(f"deployment {name} of endpoint {endpoint} takes traffic: route it elsewhere first")
        write_json(traffic_file, {other: share for other, share in traffic.items() if other != name})
        _remove_deployment(data_dir, folder)
        return True


def delete(data_dir: Path, name: str) -> bool:
    """Remove the endpoint with every deployment, and servers left serving nothing. False if there
    was none. A deletion cut short (the process killed) is finished by the next."""
    directory = _directory(data_dir, name)
    with _changing(data_dir):
        if not (directory / "endpoint.json").exists() and not (directory / _DELETING).exists():
            return False
        _finish_deleting(data_dir, directory)
        return True


def _finish_deleting(data_dir: Path, directory: Path) -> None:
    (directory / _DELETING).touch()  # the intent first: whoever finds it finishes the deletion
    (directory / "endpoint.json").unlink(missing_ok=True)  # the endpoint is gone for every reader
    for spec in sorted(directory.glob("deployments/*/deployment.json")):
        _remove_deployment(data_dir, spec.parent)
    shutil.rmtree(directory, ignore_errors=True)
    if not any((data_dir / "endpoints").glob("*/endpoint.json")):
        stop(data_dir / "gateway", "gateway")


def _remove_deployment(data_dir: Path, folder: Path) -> None:
    server_id = json.loads((folder / "deployment.json").read_text())["server"]
    shutil.rmtree(folder, ignore_errors=True)
    if any(json.loads(other.read_text()).get("server") == server_id
           for other in (data_dir / "endpoints").glob("*/deployments/*/deployment.json")):  # fmt: skip
        return  # the server drops the deployment's adapter when it sees the folder gone
    server = data_dir / "servers" / server_id
    stop(server, "server")
    shutil.rmtree(server, ignore_errors=True)
