"""Local fine-tune jobs: each a detached trainer process with its own folder, log and status file,
so a job outlives whoever submitted it, as an Azure ML job does.

Folder `<data dir>/jobs/<job name>/`: `job.json` (what to do), `status.json` (where it stands),
`trainer.log`, `trainer.lock` (held while the trainer runs), `trainer.pid`, `inputs/`,
`checkpoints/`, `outputs/mlflow_model_folder/`, `metrics.json`, `loss_curve.png`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.backends.interface import BackendError
from shared.backends.local.processes import file_lock, pid_of, running, spawn, started, write_json
from shared.eventgrid import send_event
from shared.validation import JOB_NAME
from shared.vocabulary import PIPELINE_RUN_TYPE, RUN_STATUS_CHANGED, TEST_FILE, TRAIN_FILE, JobStatus

_PUBLISHED = "event-published"
TRAINER = "trainer"  # its role: trainer.log, trainer.lock, trainer.pid
PROGRESS_FILE = "progress.json"


class JobError(BackendError):
    """A job request that cannot be carried out; the message says why."""


@dataclass(frozen=True)
class JobSpec:
    """Everything the trainer process needs; written to job.json."""

    job_name: str
    base_model: str
    parameters: dict[str, Any]
    experiment_name: str
    tracking_uri: str
    models_dir: str
    tags: dict[str, str] = field(default_factory=dict)
    events_endpoint: str | None = None
    events_key: str | None = None


@dataclass(frozen=True)
class JobRecord:
    """Where a job stands; written to status.json."""

    job_name: str
    status: JobStatus
    reason: str | None = None
    pid: int | None = None
    started_at: str | None = None
    ended_at: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobRecord:
        return cls(**{**data, "status": JobStatus(data["status"])})


def check_job_name(name: str) -> str:
    try:
        return str(JOB_NAME.parse(name))
    except ValueError:
        raise JobError(f"job name {name!r}: {JOB_NAME.expects}") from None


def job_dir(data_dir: Path, job_name: str) -> Path:
    return data_dir / "jobs" / check_job_name(job_name)


def _now() -> str:
    return datetime.now(UTC).isoformat()


def write_state(directory: Path, state: JobRecord) -> None:
    write_json(directory / "status.json", asdict(state))


def progress_line(progress: dict[str, Any]) -> str:
    """`step 12/40, loss 5.12, 3,600 tokens/s, about 8 s left`."""
    eta = progress.get("eta_s")
    left = f", about {eta:.0f} s left" if eta is not None else ""
    return (f"step {progress['step']}/{progress['total_steps']}, loss {progress['loss']:.3f}, "
            f"{progress['tokens_per_second']:,.0f} tokens/s{left}")  # fmt: skip


def read_progress(directory: Path) -> dict[str, Any] | None:
    """How far a running job is: step, total_steps, loss, tokens_per_second, eta_s."""
    path = directory / PROGRESS_FILE
    return dict(json.loads(path.read_text())) if path.exists() else None


def read_spec(directory: Path) -> JobSpec:
    return JobSpec(**json.loads((directory / "job.json").read_text()))


def publish_once(directory: Path, state: JobRecord) -> None:
    """Publish the job's final status event exactly once, whoever notices the end first."""
    spec = read_spec(directory)
    try:
        (directory / _PUBLISHED).open("x").close()
    except FileExistsError:
        return
    if spec.events_endpoint and spec.events_key:
        publish_job_status(spec, state.status)


def publish_job_status(spec: JobSpec, status: JobStatus) -> None:
    """Publish a job's status as Azure ML does (`RunStatusChanged` of a pipeline run), so the local
    trainer and Azure ML drive the same job-events function."""
    from azure.core.credentials import AzureKeyCredential

    assert spec.events_endpoint and spec.events_key
    data = {
        "experimentId": spec.experiment_name,
        "experimentName": spec.experiment_name,
        "runId": spec.job_name,
        "runType": PIPELINE_RUN_TYPE,
        "runTags": dict(spec.tags),
        "runProperties": {},
        "runStatus": str(status),
    }
    subject = f"experiments/{spec.experiment_name}/runs/{spec.job_name}"
    send_event(spec.events_endpoint, AzureKeyCredential(spec.events_key), subject, RUN_STATUS_CHANGED, "2", data)


def _recorded(directory: Path) -> JobRecord:
    return JobRecord.from_json(json.loads((directory / "status.json").read_text()))


def read_state(directory: Path) -> JobRecord:
    """The job's status; a trainer that died without saying so ends as Failed (and is published).
    Queued with no trainer started: its submitter was cut short, and the next submit starts it."""
    if not (directory / "status.json").exists():
        raise JobError(f"no job {directory.name!r}")
    recorded = _recorded(directory)
    # The trainer looked at before its status is read: one that ended wrote its final status first,
    # and one starting now is not taken for one that ended.
    was_started = started(directory, TRAINER)
    alive = running(directory, TRAINER, recorded.pid)
    state = _recorded(directory)
    if state.status.is_terminal or alive:
        return state
    if state.status == JobStatus.QUEUED and not was_started:
        return state
    failed = JobRecord(
        state.job_name,
        JobStatus.FAILED,
        reason="the trainer process ended without reporting a result (killed or crashed); see trainer.log",
        pid=state.pid,
        started_at=state.started_at,
        ended_at=_now(),
    )
    write_state(directory, failed)
    publish_once(directory, failed)
    return failed


def _stage_inputs(prepared: Path, inputs: Path) -> None:
    for name in (TRAIN_FILE, TEST_FILE):
        source = prepared / name
        if not source.is_file():
            raise JobError(f"{source}: no such file; --prepared must be a folder written by 'prepare'")
    inputs.mkdir(parents=True, exist_ok=True)
    for name in (TRAIN_FILE, TEST_FILE):
        shutil.copyfile(prepared / name, inputs / name)


def submit(data_dir: Path, spec: JobSpec, prepared: Path, restart: bool = False) -> JobRecord:
    """Start the job, or find it: a job that exists is returned as it is, unless `restart` is
    set and it ended without completing, in which case it resumes from its last checkpoint.

    Safe to kill at any point and call again: one submitter of a job at a time (a lock the
    system frees when its holder dies), a job without `status.json` is one whose submitter died
    staging it (staged again), and one Queued with no trainer ever started is started."""
    directory = job_dir(data_dir, spec.job_name)
    with file_lock(data_dir / "jobs" / ".submitting" / directory.name):
        state = read_state(directory) if (directory / "status.json").exists() else None
        if state is None:
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
            try:
                _stage_inputs(prepared, directory / "inputs")
            except JobError:
                shutil.rmtree(directory)
                raise
        elif state.status == JobStatus.QUEUED and not started(directory, TRAINER) and not running(directory, TRAINER):
            pass  # recorded as submitted, but its submitter was killed before starting the trainer
        elif restart and state.status.is_terminal and state.status != JobStatus.COMPLETED:
            for left in (_PUBLISHED, f"{TRAINER}.pid"):  # the last trainer's: this one has not started
                (directory / left).unlink(missing_ok=True)
        else:
            return state
        write_json(directory / "job.json", asdict(spec), private=True)  # it holds the topic's key
        write_state(directory, JobRecord(spec.job_name, JobStatus.QUEUED, started_at=_now()))
        pid = spawn("shared.backends.local.trainer", directory, TRAINER)
        # The trainer writes only final states; it needs seconds to start, so this write comes first.
        if not read_state(directory).status.is_terminal:
            write_state(directory, JobRecord(spec.job_name, JobStatus.RUNNING, pid=pid, started_at=_now()))
    return read_state(directory)


def cancel(data_dir: Path, job_name: str) -> JobRecord:
    directory = job_dir(data_dir, job_name)
    state = read_state(directory)
    pid = state.pid or pid_of(directory, TRAINER)
    if not state.status.is_terminal and pid:
        os.kill(pid, signal.SIGTERM)  # the trainer records Canceled and publishes
    return state
