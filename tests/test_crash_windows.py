"""The local backend cut short: a submitter or deployer killed right after any one of its writes,
then run again, leaves exactly one of each process it starts (counted by the system's process
table, not by anything the backend wrote), and no job stuck half-submitted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from shared.backends.local import jobs
from shared.backends.local.settings import TINY_PHI3
from shared.backends.local.tiny_model import build_tiny_phi3
from shared.datasets.sample import conversations
from shared.dev.adapters import random_adapter_model
from shared.vocabulary import TEST_FILE, TRAIN_FILE, JobStatus
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
    # Every write was a kill point (the lock's folder, the job's folder, its inputs, job.json, the
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
    # ... and, with both stopped before each attempt, the writes that start them, and the record
    # of the deployment written before its server was started.
    kill_at = ["spawn shared.backends.local.gateway", "spawn shared.backends.local.serve", "main/deployment.json"]
    plan = {**plan, "triggers": ["ep-cut-gateway", "ep-cut-server", "ep-cut-record", "ep-whole"],
            "kill_at": [*kill_at, 0], "stop_serving": True}  # fmt: skip
    starting = walk_in_a_process(tmp_path / "starting", plan)
    assert all(point in attempt["killed_after"] for point, attempt in zip(kill_at, starting, strict=False))
    assert len(starting) == len(kill_at) + 1
    for attempt in attempts + starting:
        assert len(attempt["running"]["server"]) == 1 and attempt["running"]["gateway"] == ["gateway"], attempt
        deployments = list((data_dir / "endpoints" / attempt["trigger"] / "deployments").iterdir())
        assert [found.name for found in deployments] == ["main"], attempt
        status, _ = endpoints.invoke(data_dir, attempt["trigger"], {"input_data": {
            "input_string": [{"role": "user", "content": "hi"}], "parameters": {"max_new_tokens": 2}}},
            deployment="main")  # fmt: skip
        assert status == 200, attempt


def test_a_job_whose_trainer_is_starting_is_not_started_twice(tmp_path: Path) -> None:
    """Its submitter died the instant after starting the trainer, which has its lock but has not
    written its pid yet: a submit again finds it queued and leaves it be."""
    import fcntl

    directory = tmp_path / "jobs" / "job-starting"
    directory.mkdir(parents=True)
    spec = jobs.JobSpec("job-starting", "tiny", {}, "walk", "sqlite:///x.db", str(tmp_path / "models"))
    jobs.write_state(directory, jobs.JobRecord("job-starting", JobStatus.QUEUED))
    with (directory / "trainer.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # what the trainer holds from before it exists
        assert jobs.submit(tmp_path, spec, tmp_path / "no-such-folder").status == JobStatus.QUEUED
        assert jobs.read_state(directory).status == JobStatus.QUEUED
    assert not (directory / "trainer.log").exists()  # nothing was started
