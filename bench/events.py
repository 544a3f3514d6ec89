"""Handler latency of the event flow on the Azure ML path, with the real azure-ai-ml SDK (against
the tests' fake service at the HTTP transport level, so no network time is counted) and the
ledger on a real Azurite:

- blob event -> job submitted: `submit_run` for a prepared run (preparation excluded);
- Completed event -> deployment started: `finish_job` until the run is `deploying`.

p50/p99 over N events, each for its own run. Goal: p99 under 1 s.
Usage: .venv/bin/python bench/events.py [--events 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shared.backends.azureml.backend import AzureMLBackend  # noqa: E402
from shared.dev.azurite import start_azurite  # noqa: E402
from shared.events import finish_job  # noqa: E402
from shared.intake import submit_run  # noqa: E402
from shared.ledger import Ledger, RunState, Upload  # noqa: E402
from shared.settings import load_settings  # noqa: E402
from shared.storage import table_service  # noqa: E402
from shared.vocabulary import JobStatus  # noqa: E402
from tests.fake_azureml import RG, SUB, WS, FakeAzureML, FakeCredential  # noqa: E402


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(seconds: list[float]) -> dict[str, float]:
    return {"p50_ms": round(1000 * statistics.median(seconds), 1), "p99_ms": round(1000 * percentile(seconds, 99), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200)
    args = parser.parse_args()
    azurite = start_azurite()
    try:
        settings = load_settings({
            # The ledger on Azurite; the blob URIs Azure ML is given are never fetched here.
            "AzureWebJobsStorage": azurite.connection_string.replace(
                f"BlobEndpoint=http://127.0.0.1:{azurite.ports['Blob']}/devstoreaccount1", "BlobEndpoint=https://stbench.blob.core.windows.net"
            ), "ML_BACKEND": "azureml", "AZURE_SUBSCRIPTION_ID": SUB,
            "AZURE_RESOURCE_GROUP": RG, "AZUREML_WORKSPACE_NAME": WS, "AZUREML_COMPUTE_CLUSTER": "gpu-a100",
            "BASE_MODEL": "Phi-4:7", "LOCAL_DATA_DIR": os.devnull,
        })  # fmt: skip
        fake = FakeAzureML()
        backend = AzureMLBackend(settings, transport=fake, credential=FakeCredential())
        ledger = Ledger(table_service(settings.storage).create_table_if_not_exists("benchruns"))

        submit_times, deploy_times = [], []
        for index in range(args.events):
            run, _ = ledger.receive(Upload("datasets", f"bench-{index}.jsonl", uuid.uuid4().hex), "received")
            run = ledger.advance(run, RunState.PREPARED, "prepared", details={"report": {"sha256": "0" * 64}})

            started = time.perf_counter()
            run = submit_run(settings, ledger, run, backend)
            submit_times.append(time.perf_counter() - started)
            assert run.state == RunState.SUBMITTED, run.reason

            fake.set_job_status(run.job_name or "", "Completed")
            started = time.perf_counter()
            run = finish_job(settings, ledger, run, JobStatus.COMPLETED, None, backend)
            deploy_times.append(time.perf_counter() - started)
            assert run.state == RunState.DEPLOYING, (run.state, run.reason)
    finally:
        azurite.stop()
    results = {
        "blob_event_to_job_submitted": summary(submit_times),
        "completed_to_deployment_started": summary(deploy_times),
    }
    met = all(result["p99_ms"] < 1000 for result in results.values())
    print(json.dumps({**results, "events": args.events, "goal": "p99 < 1000 ms", "met": met}, indent=2))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
