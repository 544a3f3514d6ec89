"""The end-to-end demo on the local backend: every stage the app has, run for real, on this
machine. It says plainly which stages are not built yet instead of pretending."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shared.azurite import start_azurite

NOT_BUILT_YET = "training, registration, deployment, smoke test and idle teardown"


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


def _function(name: str) -> Callable[..., Any]:
    """A function of the real app, found by name as the Functions host finds it."""
    import function_app

    for function in function_app.app.get_functions():
        if function.get_function_name() == name:
            return function.get_user_function()
    raise DemoFailed("load the function app", f"no function named {name}")


def run_demo() -> int:
    try:
        _run()
    except DemoFailed as failure:
        print(f"demo failed at {failure}", file=sys.stderr)
        return 1
    return 0


def _run() -> None:
    from azure.functions.blob import InputStream

    from shared.datasets.sample import write_sample
    from shared.ledger import open_ledger
    from shared.settings import STORAGE_SETTING, get_settings
    from shared.storage import DATASETS_CONTAINER, PREPARED_CONTAINER, blob_service

    with tempfile.TemporaryDirectory(prefix="finetune-demo-") as work:
        with _step("start Azurite (local Azure Storage)"):
            azurite = start_azurite()
        try:
            os.environ[STORAGE_SETTING] = azurite.connection_string
            get_settings.cache_clear()
            settings = get_settings()
            intake = _function("dataset_intake")

            with _step("generate a sample ultrachat-shaped dataset and upload it to datasets/"):
                sample = write_sample(Path(work) / "ultrachat_sample.jsonl", 200, seed=42)
                container = blob_service(settings.storage).get_container_client(DATASETS_CONTAINER)
                container.create_container()
                with sample.open("rb") as data:
                    uploaded = container.upload_blob(sample.name, data)
                etag = str(uploaded.get_blob_properties().etag)
                _say(f"    uploaded {DATASETS_CONTAINER}/{sample.name} ({sample.stat().st_size:,} bytes)")

            with _step("blob trigger: dataset intake validates and splits the upload"):
                # Azurite sends no Event Grid events, so the demo delivers the BlobCreated itself.
                stream = InputStream(
                    data=b"", name=f"{DATASETS_CONTAINER}/{sample.name}", blob_properties={"ETag": etag}
                )
                intake(stream)
                (run,) = open_ledger(settings).by_blob(DATASETS_CONTAINER, sample.name)
                for entry in open_ledger(settings).history(run.run_id):
                    _say(f"    {entry.at:%H:%M:%S} {entry.state:<10} {entry.message}")
                if run.state != "prepared":
                    raise DemoFailed("dataset intake", f"run {run.run_id} is {run.state}: {run.reason}")

            report: dict[str, Any] = run.details["report"]
            _say(f"    run {run.run_id}: {json.dumps(report['split'])}, "
                 f"~{report['estimated_training_tokens']:,} training tokens")  # fmt: skip
            _say(
                f"    prepared files: {PREPARED_CONTAINER}/{run.run_id}/ (train_sft.jsonl, test_sft.jsonl, report.json)"
            )
            _say(f"==> not built yet: {NOT_BUILT_YET}. The demo stops after preparation.")
        finally:
            azurite.stop()
            _say("==> stopped Azurite")
