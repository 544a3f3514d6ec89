"""The local backend cut short: a submitter or deployer killed right after any one of its writes,
then run again, leaves exactly one of each process it starts (counted by the system's process
table, not by anything the backend wrote), and no job stuck half-submitted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from shared.backends.local.settings import TINY_PHI3
from shared.backends.local.tiny_model import build_tiny_phi3
from shared.datasets.sample import conversations
from shared.dev.adapters import random_adapter_model
from shared.vocabulary import TEST_FILE, TRAIN_FILE
from tests.conftest import stop_local_processes
from tests.killing import walk_in_a_process

pytestmark = pytest.mark.slow


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    data = tmp_path / "local"
    data.mkdir()
    yield data
    stop_local_processes(data)


def test_a_job_submission_killed_after_any_write_starts_one_trainer_when_submitted_again(
    tmp_path: Path, data_dir: Path
) -> None:
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    for name, seed in ((TRAIN_FILE, 1), (TEST_FILE, 2)):
        (prepared / name).write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in conversations(8, seed=seed)))
    (tmp_path / "logs").mkdir()
    plan = {"action": "submit", "triggers": [f"job-cut-{number}" for number in range(30)], "data_dir": str(data_dir),
            "base_model": str(build_tiny_phi3(tmp_path / TINY_PHI3)), "prepared": str(prepared)}  # fmt: skip
    attempts = walk_in_a_process(tmp_path / "logs", plan)
    # Every write was a kill point (the claim of the job's folder, its inputs, job.json, the
    # queued status, the trainer's start, the running status): the last attempt made fewer.
    assert 0 < len(attempts[-1]["attempt"]) < len(attempts)
    for attempt in attempts:
        job = attempt["trigger"]
        started = [write for write in attempt["attempt"] + attempt["again"] if write.split()[1] == "spawn"]
        assert len(started) == 1 and attempt["running"]["trainer"] == [job], attempt
    # No folder left half-claimed: every job has its status.
    triggers = sorted(attempt["trigger"] for attempt in attempts)
    assert sorted(path.name for path in data_dir.glob("jobs/*") if path.name != ".submitting") == triggers
    assert sorted(path.parent.name for path in data_dir.glob("jobs/*/status.json")) == triggers


def test_a_deployment_killed_after_any_write_serves_once_when_deployed_again(tmp_path: Path, data_dir: Path) -> None:
    from shared.backends.local import endpoints

    model = random_adapter_model(build_tiny_phi3(tmp_path / TINY_PHI3), tmp_path / "adapter", seed=1)
    (tmp_path / "logs").mkdir()
    (tmp_path / "starting").mkdir()
    # Every write of a deployment to a new endpoint, with the gateway and the server running...
    plan = {"action": "deploy", "triggers": [f"ep-cut-{number}" for number in range(20)], "data_dir": str(data_dir),
            "model": str(model)}  # fmt: skip
    attempts = walk_in_a_process(tmp_path / "logs", plan)
    assert 0 < len(attempts[-1]["attempt"]) < len(attempts)
    # ... and the writes that start them, with both stopped before each attempt.
    started = ["spawn shared.backends.local.gateway", "spawn shared.backends.local.serve"]
    plan = {**plan, "triggers": ["ep-cut-gateway", "ep-cut-server", "ep-whole"], "kill_at": [*started, 0],
            "stop_serving": True}  # fmt: skip
    starting = walk_in_a_process(tmp_path / "starting", plan)
    assert [" ".join(attempt["killed_after"].split()[1:3]) for attempt in starting[:-1]] == started
    for attempt in attempts + starting:
        assert len(attempt["running"]["server"]) == 1 and attempt["running"]["gateway"] == ["gateway"], attempt
        deployments = list((data_dir / "endpoints" / attempt["trigger"] / "deployments").iterdir())
        assert [found.name for found in deployments] == ["main"], attempt
        status, _ = endpoints.invoke(data_dir, attempt["trigger"], {"input_data": {
            "input_string": [{"role": "user", "content": "hi"}], "parameters": {"max_new_tokens": 2}}},
            deployment="main")  # fmt: skip
        assert status == 200, attempt
