"""Kill a handler right after its N-th write, for every N in turn, and deliver its trigger again.

A write is anything that changes the world outside the process: a request to storage or Event
Grid that is not a read (ledger rows, blobs, lifecycle events), a file the local backend writes
whole, a folder it makes, a file it copies, a process it starts, a model registered in MLflow.
Each is logged as it happens, with its number, so a test knows how many writes a step makes and
which one a kill followed.

`python -m tests.killing PLAN` walks a plan (JSON, see `walk`): for attempt N it prepares a fresh
trigger, delivers it in a process that SIGKILLs itself right after write N, then delivers it
again in a process left alone, as Event Grid or the blob trigger would after a crash; it stops at
the first attempt that finishes before write N (so every write was a kill point). Every process
is a fork of this one, which imported what the handlers import and then started nothing (no
thread, no connection), so each attempt costs the handler's work, not Python's start-up."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

_READS = {"GET", "HEAD", "OPTIONS"}


# What the flow asks of a backend that changes something: each call one write of the flow (what
# it writes inside is the backend's own, walked in tests/test_crash_windows.py).
BACKEND_EFFECTS = ("submit", "register", "continue_deployment", "deploy", "set_traffic", "delete_deployment",
                   "delete_endpoint")  # fmt: skip


def _targets(level: str) -> list[tuple[Any, str, Callable[..., str | None]]]:
    """(owner, attribute, what a call wrote given its result and arguments: a label, or None when
    it changed nothing). Level "flow": requests to storage and Event Grid, and the backend's
    effects; "local": requests, and the local backend's own writes."""
    from azure.core.pipeline.transport import RequestsTransport

    from shared.backends.local import processes
    from shared.backends.local.backend import LocalBackend

    data_dir = os.environ["LOCAL_DATA_DIR"]

    def request(response: Any, transport: Any, sent: Any, *_: Any, **__: Any) -> str | None:
        refused = response.status_code >= 400  # a conflict or a failed condition: nothing changed
        return None if sent.method in _READS or refused else f"{sent.method} {sent.url.split('?')[0]}"

    def local(what: str, path: int) -> Callable[..., str | None]:
        """A change to argument `path`, under the local backend's folder (not a temporary one)."""
        return lambda _, *arguments, **__: (
            f"{what} {arguments[path]}" if str(arguments[path]).startswith(data_dir) else None
        )

    def named(what: str, first: int = 0) -> Callable[..., str]:
        return lambda _, *arguments, **__: f"{what} {' '.join(str(a) for a in arguments[first : first + 3])}"

    if level == "flow":
        return [(RequestsTransport, "send", request),
                *[(LocalBackend, effect, named(f"backend {effect}", 1)) for effect in BACKEND_EFFECTS]]  # fmt: skip
    return [
        (RequestsTransport, "send", request),
        (processes, "write_json", named("write")),
        (processes, "spawn", named("spawn")),
        (shutil, "copyfile", local("copy", 1)),
        (os, "mkdir", local("mkdir", 0)),  # what Path.mkdir calls for each folder it makes
    ]


def count_writes(kill_after: int | str, log: Path, level: str = "flow") -> None:
    """From now on, log every write of this process (of `level`, see `_targets`), and die by
    SIGKILL right after write number `kill_after` (0: never), or the first whose label has
    `kill_after` in it, as a process killed at that instruction would. A write made inside
    another (a backend's effect) is part of it, not counted again."""
    numbers = itertools.count(1)
    lock = threading.Lock()
    inside = threading.local()

    def wrap(original: Callable[..., Any], label: Callable[..., str | None]) -> Callable[..., Any]:
        def counted(*arguments: Any, **keywords: Any) -> Any:
            if getattr(inside, "depth", 0):
                return original(*arguments, **keywords)
            inside.depth = 1
            try:
                result = original(*arguments, **keywords)
            finally:
                inside.depth = 0
            what = label(result, *arguments, **keywords)
            if what is not None:
                with lock:
                    number = next(numbers)
                    with log.open("a") as written:
                        written.write(f"{number} {what}\n")
                    if number == kill_after or (isinstance(kill_after, str) and kill_after in what):
                        os.kill(os.getpid(), signal.SIGKILL)
            return result

        return counted

    for owner, name, label in _targets(level):
        original = getattr(owner, name)
        counted = wrap(original, label)
        setattr(owner, name, counted)
        for module in list(sys.modules.values()):  # `from processes import write_json` made copies
            if module is not owner and getattr(module, name, None) is original:
                setattr(module, name, counted)


def writes(log: Path) -> list[str]:
    """What a counted process wrote, in order."""
    return log.read_text().splitlines() if log.exists() else []


def _forked(work: Callable[[], None]) -> int:
    """Run `work` in a child process; its exit status (negative: the signal that ended it)."""
    return _ended(_started(work))


def _ended(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _started(work: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            work()
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def _deliver_upload(blob_name: str) -> None:
    from tests.worker import deliver_upload

    deliver_upload(blob_name)


def _deliver_completed(job_name: str) -> None:
    from functions.job_events import job_events
    from tests.worker import completed_event

    job_events.build().get_user_function()(completed_event(job_name))


def _submitted_with_finished_job(blob_name: str, trained: Path) -> str:
    """A run of `blob_name` (uploaded already) prepared and submitted by the intake's own steps,
    its job a copy of the finished job `trained`, as if it had trained: the walk over the job's
    Completed event then costs no training per attempt. Returns the job's name."""
    from shared.backends.interface import job_name_for
    from shared.intake import prepare_run, submit_run
    from shared.ledger import Upload, open_ledger
    from shared.settings import get_settings
    from shared.storage import blob_service
    from shared.vocabulary import DATASETS_CONTAINER, RUN_ID_TAG

    settings = get_settings()
    ledger = open_ledger(settings)
    blob = blob_service(settings.storage).get_blob_client(DATASETS_CONTAINER, blob_name)
    etag = str(blob.get_blob_properties().etag).strip('"')
    run, _ = ledger.receive(Upload(DATASETS_CONTAINER, blob_name, etag), "received")
    run = prepare_run(settings, ledger, run, blob)
    job = trained.parent / job_name_for(run.run_id)
    shutil.copytree(trained, job, ignore=shutil.ignore_patterns("checkpoints", "trainer.*"))
    spec = json.loads((job / "job.json").read_text())
    spec["job_name"] = job.name
    spec["tags"].update({"dataset": run.run_id.rsplit("-", 1)[0], RUN_ID_TAG: run.run_id})
    (job / "job.json").write_text(json.dumps(spec))
    status = json.loads((job / "status.json").read_text())
    (job / "status.json").write_text(json.dumps({**status, "job_name": job.name}))
    metrics = json.loads((job / "metrics.json").read_text())
    metrics["model_folder"] = metrics["model_folder"].replace(str(trained), str(job))
    (job / "metrics.json").write_text(json.dumps(metrics))
    submit_run(settings, ledger, run)  # finds the job there, Completed
    return job.name


def _delivery(deliver: Callable[[str], None], trigger: str, kill_after: int | str, log: Path, level: str) -> None:
    count_writes(kill_after, log, level)
    deliver(trigger)


def _set_up(blob_name: str, trained: Path, made: Path) -> None:
    made.write_text(_submitted_with_finished_job(blob_name, trained))


def _janitor_tick_once_claims_lapsed() -> None:
    """The janitor's tick once the claims of the killed handlers on their runs have lapsed: a
    handler that dies holding a run's claim leaves it to whoever comes after the claim's time to
    live (the ledger's clock is moved on by that much)."""
    from datetime import timedelta

    from shared import ledger
    from shared.deployment import CLAIM_TTL
    from shared.janitor import sweep
    from shared.settings import get_settings

    now = ledger._now
    ledger._now = lambda: now() + CLAIM_TTL + timedelta(minutes=1)  # type: ignore[assignment]
    settings = get_settings()
    sweep(settings, ledger.open_ledger(settings), past_due=False)


def started_processes(module: str, data_dir: Path) -> list[str]:
    """The folders of the live processes running `module` under `data_dir`, one entry per process,
    found by their command lines (not by anything the code under test wrote)."""
    from shared.backends.local.processes import pid_alive

    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            arguments = cmdline.read_bytes().decode().split("\0")
        except OSError:
            continue  # ended meanwhile
        live = pid_alive(int(cmdline.parent.name))  # not a zombie either
        if module in arguments and live and arguments[-2].startswith(str(data_dir)):
            found.append(Path(arguments[-2]).name)
    return sorted(found)


def _submit_job(plan: dict[str, Any], job_name: str) -> None:
    from shared.backends.local import jobs

    spec = jobs.JobSpec(job_name, plan["base_model"], {}, "walk", f"sqlite:///{plan['data_dir']}/mlflow.db",
                        f"{plan['data_dir']}/models")  # fmt: skip
    jobs.submit(Path(plan["data_dir"]), spec, Path(plan["prepared"]))


def _deploy(plan: dict[str, Any], endpoint: str) -> None:
    from shared.backends.local import endpoints

    data_dir = Path(plan["data_dir"])
    endpoints.deploy(data_dir, endpoint, "main", ("walked", "1", Path(plan["model"])), {}, 60)
    endpoints.wait_ready(data_dir, endpoint, "main")


# role: the module its process runs
ROLES = {"trainer": "shared.backends.local.trainer", "server": "shared.backends.local.serve",
         "gateway": "shared.backends.local.gateway"}  # fmt: skip


def _stop_all(data_dir: Path, role: str) -> None:
    from shared.backends.local.processes import stop

    for found in data_dir.glob({"trainer": "jobs/*", "server": "servers/*", "gateway": "gateway"}[role]):
        stop(found, role, grace_s=5)


def _stop_serving(data_dir: Path) -> None:
    """No gateway and no server running, as after a reboot, and no server ever started."""
    _stop_all(data_dir, "server")
    _stop_all(data_dir, "gateway")
    shutil.rmtree(data_dir / "servers", ignore_errors=True)


def walk(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Plan: `action`, `triggers`, `logs` (a folder), `data_dir` (the local backend's):
    - "upload": deliver the upload of each blob named in `triggers`;
    - "completed": for each blob, a run submitted with a copy of the finished job `trained`, and
      its job's Completed event delivered;
    - "submit": the local backend's `jobs.submit` of each job named (`base_model`, `prepared`);
    - "deploy": the local backend's deployment of `model` to each endpoint named (with
      `stop_serving`, its gateway and servers stopped before each attempt).
    Upload and completed count the flow's writes, submit and deploy the local backend's (see
    `_targets`). With `kill_at` (one per trigger: a number, a label such as
    "spawn shared.backends.local.serve", or 0 for none), the kill points are those. With `lanes`
    (2), attempts on separate triggers run two at a time.
    Returns, per attempt: its trigger, the write it was killed after (None for one that
    finished), the writes of the attempt and of the delivery after it, and the processes running
    after them (trainers, servers, gateways: their folders), up to the first that finished."""
    kill_points = list(plan["kill_at"]) if "kill_at" in plan else list(range(1, len(plan["triggers"]) + 1))
    attempts = list(enumerate(zip(kill_points, plan["triggers"], strict=False), start=1))
    lanes = plan.get("lanes", 1)
    logs = Path(plan["logs"])
    pids = [_started(partial(_lane, plan, attempts[lane::lanes], logs / f"lane-{lane}.json")) for lane in range(lanes)]
    assert [_ended(pid) for pid in pids] == [0] * lanes, "a lane of the walk failed"
    done = sorted((record for lane in range(lanes) for record in json.loads((logs / f"lane-{lane}.json").read_text())),
                  key=lambda record: record["number"])  # fmt: skip
    ended = next((number for number, record in enumerate(done) if record["killed_after"] is None), None)
    assert ended is not None, f"every one of {len(done)} attempts was killed: the plan needs more triggers"
    if plan["action"] == "completed":  # two ticks at once (two instances of the app), as on a scaled-out host
        ticks = [_started(_janitor_tick_once_claims_lapsed) for _ in range(2)]
        assert [_ended(tick) for tick in ticks] == [0, 0], "a janitor's tick failed"
    return done[: ended + 1]


def _lane(plan: dict[str, Any], attempts: list[tuple[int, tuple[int | str, str]]], results: Path) -> None:
    """Attempts one after the other, until one finishes; their records to `results`."""
    done = []
    for number, (kill_after, given) in attempts:
        done.append(_attempt(plan, number, kill_after, given))
        if done[-1]["killed_after"] is None:
            break
    results.write_text(json.dumps(done))


def _attempt(plan: dict[str, Any], number: int, kill_after: int | str, given: str) -> dict[str, Any]:
    logs, data_dir, action = Path(plan["logs"]), Path(plan["data_dir"]), plan["action"]
    level = "flow" if action in ("upload", "completed") else "local"
    deliver = {"upload": _deliver_upload, "completed": _deliver_completed, "submit": partial(_submit_job, plan),
               "deploy": partial(_deploy, plan)}[action]  # fmt: skip
    trigger = given
    if action == "completed":
        made = logs / f"job-{number}"
        assert _forked(partial(_set_up, given, Path(plan["trained"]), made)) == 0, f"set-up {number} failed"
        trigger = made.read_text()
    if plan.get("stop_serving"):
        _stop_serving(data_dir)
    attempt, again = logs / f"attempt-{number}.log", logs / f"again-{number}.log"
    ended = _forked(partial(_delivery, deliver, trigger, kill_after, attempt, level))
    assert ended in (0, -signal.SIGKILL), f"attempt {number} ended with {ended}"
    finished = ended == 0
    if not finished:
        assert _forked(partial(_delivery, deliver, trigger, 0, again, level)) == 0, f"redelivery {number} failed"
    running = {role: started_processes(module, data_dir) for role, module in ROLES.items()}
    if action in ("upload", "submit"):  # each job's trainer: not needed once it has started
        _stop_all(data_dir, "trainer")
    return {"number": number, "trigger": trigger, "killed_after": None if finished else writes(attempt)[-1],
            "attempt": writes(attempt), "again": writes(again), "running": running}  # fmt: skip


def walk_in_a_process(logs: Path, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """`walk(plan)` in a process of its own (forks are made from it, not from the test's process,
    which has threads), its logs in `logs`; checks each attempt but the last was killed."""
    (logs / "plan.json").write_text(json.dumps({**plan, "logs": str(logs)}))
    walked = subprocess.run([sys.executable, "-m", "tests.killing", str(logs / "plan.json")], capture_output=True,
                            text=True, check=False, timeout=900)  # fmt: skip
    assert walked.returncode == 0, walked.stderr[-3000:]
    attempts: list[dict[str, Any]] = json.loads(walked.stdout.splitlines()[-1])
    *killed, last = attempts
    assert all(attempt["killed_after"] for attempt in killed) and last["killed_after"] is None
    return attempts


def _warm() -> None:
    """Import what the handlers import, so that forks share it; start nothing."""
    import azure.data.tables
    import azure.eventgrid
    import azure.storage.blob  # noqa: F401
    import mlflow.tracking  # noqa: F401
    from transformers import AutoTokenizer  # noqa: F401

    import functions.intake
    import functions.job_events  # noqa: F401
    import shared.backends.local.backend
    import shared.deployment
    import shared.intake  # noqa: F401

    assert threading.active_count() == 1, [thread.name for thread in threading.enumerate()]


def main(argv: list[str]) -> None:
    plan = json.loads(Path(argv[0]).read_text())
    os.environ["LOCAL_DATA_DIR"] = plan["data_dir"]  # where writes are counted (see `_targets`)
    _warm()
    print(json.dumps(walk(plan)))


if __name__ == "__main__":
    main(sys.argv[1:])
