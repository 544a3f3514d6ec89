"""The end-to-end demo on the local backend, with nothing faked: Azurite for storage, the local
host running the real function app, a real (tiny) model trained, registered, judged on held-out
conversations, served, chatted with, and torn down by the janitor once idle."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shared.dev.azurite import DEMO_STORE, start_azurite

DEMO_DIR = Path(__file__).resolve().parents[2] / ".local" / "demo"
DEMO_SETTINGS = {
    "ML_BACKEND": "local",
    "LOCAL_DATA_DIR": str(DEMO_DIR),
    "JANITOR_SCHEDULE": "*/5 * * * * *",  # every 5 seconds, so the demo sees the teardown
    "ENDPOINT_IDLE_MINUTES": "0.5",
    "ENDPOINT_MIN_AGE_MINUTES": "0",
    "BASE_MODEL": "tiny-phi3",
}
# Per-upload overrides, as blob metadata: a short training run for a demo on a CPU.
UPLOAD_METADATA = {"num_train_epochs": "2", "per_device_train_batch_size": "4", "learning_rate": "0.001"}
QUESTION = "Can you explain the water cycle in simple terms?"


class DemoFailed(Exception):
    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")


def _say(message: str) -> None:
    print(message, flush=True)


@contextmanager
def _step(name: str) -> Iterator[None]:
    started = time.monotonic()
    _say(f"==> {name}")
    try:
        yield
    except DemoFailed:
        raise
    except Exception as error:
        raise DemoFailed(name, f"{type(error).__name__}: {error}") from error
    _say(f"    done in {time.monotonic() - started:.1f} s")


def run_demo() -> int:
    try:
        _run()
    except DemoFailed as failure:
        print(f"demo failed at {failure}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo interrupted", file=sys.stderr)
        return 1
    return 0


def _follow(
    ledger: Any, run_id: str, until: set[str], seen: int, timeout_s: float, step: str, backend: Any
) -> tuple[Any, int]:
    """Print the run's history as it grows until it reaches one of `until` (or fails), and the
    training's progress while its job runs."""
    from shared.backends.local.jobs import progress_line
    from shared.ledger import FAILURE_STATES

    deadline = time.monotonic() + timeout_s
    failures = {str(state) for state in FAILURE_STATES}
    shown, shown_at = None, 0.0
    while True:
        history = ledger.history(run_id)
        for entry in history[seen:]:
            _say(f"    {entry.at:%H:%M:%S} {entry.state:<13} {entry.message}")
        seen = len(history)
        run = ledger.get(run_id)
        running = run.state in ("submitted", "running") and run.job_name
        progress = backend.job_progress(run.job_name) if running else None
        if progress and progress != shown and time.monotonic() - shown_at >= 5:  # a line every 5 s at most
            _say(f"    {time.strftime('%H:%M:%S')} training      {progress_line(progress)}")
            shown, shown_at = progress, time.monotonic()
        if run.state in until:
            return run, seen
        if run.state in failures:
            raise DemoFailed(step, f"run {run_id} is {run.state}: {run.reason}")
        if time.monotonic() > deadline:
            raise DemoFailed(step, f"run {run_id} still {run.state} after {timeout_s:.0f} s")
        time.sleep(0.5)


def _run() -> None:
    from shared.backends.registry import get_backend
    from shared.datasets.sample import write_sample
    from shared.dev.localhost import LocalHost
    from shared.ledger import open_ledger
    from shared.settings import STORAGE_SETTING, get_settings
    from shared.storage import container
    from shared.vocabulary import DATASETS_CONTAINER

    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    DEMO_DIR.mkdir(parents=True)
    with _step("start Azurite (local Azure Storage)"):
        azurite = start_azurite(location=DEMO_STORE)  # kept after the demo: `status` reads it
    host = None
    try:
        os.environ.update({**DEMO_SETTINGS, STORAGE_SETTING: azurite.connection_string})
        with _step("start the local Functions host (blob, timer and Event Grid triggers of function_app)"):
            host = LocalHost(poll_interval_s=0.5, backoff_s=0.5).start()
            settings = get_settings()
            ledger = open_ledger(settings)
            _say(f"    Event Grid topic {host.topic.endpoint}; janitor every 5 s, idle window 30 s")

        with _step("generate a sample ultrachat-shaped dataset and upload it to datasets/"):
            sample = write_sample(DEMO_DIR / "ultrachat_sample.jsonl", 200, seed=42)
            with sample.open("rb") as data:
                container(settings.storage, DATASETS_CONTAINER).upload_blob(sample.name, data, metadata=UPLOAD_METADATA)
            _say(f"    uploaded {DATASETS_CONTAINER}/{sample.name} ({sample.stat().st_size:,} bytes), "
                 f"metadata {UPLOAD_METADATA}")  # fmt: skip

        backend = get_backend(settings)
        with _step("the upload goes through intake, training, registration, deployment and the evaluation gate"):
            deadline = time.monotonic() + 60
            while not (runs := ledger.by_blob(DATASETS_CONTAINER, sample.name)):
                if time.monotonic() > deadline:
                    raise DemoFailed("intake", "the blob trigger did not fire within 60 s")
                time.sleep(0.5)
            run_id = runs[0].run_id
            run, seen = _follow(ledger, run_id, {"deployed"}, 0, 600, "training and deployment", backend)

        with _step("chat with the deployed endpoint"):
            body = {"input_data": {"input_string": [{"role": "user", "content": QUESTION}],
                                   "parameters": {"max_new_tokens": 40}}}  # fmt: skip
            reply = backend.invoke(run.endpoint_name, body)
            _say(f"    endpoint:  {run.endpoint_name} at {run.endpoint_url} (key: python -m shared.cli keys ...)")
            _say(f"    asked:     {QUESTION}")
            _say(f"    answered:  {reply['output']!r}  (a 5M-parameter model trained for a minute: gibberish)")
            _say(f"    metrics:   {json.dumps(run.details.get('metrics', {}))}")
            _say(f"    loss plot: {run.details.get('loss_curve')}")

        with _step("leave the endpoint idle: the janitor tears it down"):
            run, _ = _follow(ledger, run_id, {"torn_down"}, seen, 180, "idle teardown", backend)
            deadline = time.monotonic() + 30  # the run is claimed first; the deletion follows
            while any(endpoint.name == run.endpoint_name for endpoint in backend.list_endpoints()):
                if time.monotonic() > deadline:
                    raise DemoFailed("idle teardown", f"endpoint {run.endpoint_name} is still there")
                time.sleep(0.5)
            _say(f"    run {run_id} is torn_down; `python -m shared.cli status {run_id}` shows it all")
    finally:
        if host is not None:
            host.stop()
        azurite.stop()
        _say("==> stopped the host and Azurite")
