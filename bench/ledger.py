"""The ledger's queries at 1,000 and at 10,000 runs, on a real Azurite: each should cost the same
at both sizes, since each is a point read or a bounded range of keys (see shared/ledger.py).

Runs are written through the ledger itself, in the shapes the flow leaves: most end rejected,
failed or torn down after a full deployment; a fixed few are rolled back (the rare state queried).
Measured at each size, median of N calls: `by_job` (a job picked at random), `by_state` for the
rare state, `recent(20)`, and `GET /api/runs?limit=20` through the function itself.
Goal: each 10k / 1k ratio <= 1.3.
Usage: .venv/bin/python bench/ledger.py [--small 1000] [--large 10000] [--calls 50]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import azure.functions as func  # noqa: E402

from shared.dev.azurite import start_azurite  # noqa: E402
from shared.ledger import Ledger, RunState, Upload, open_ledger  # noqa: E402
from shared.settings import get_settings  # noqa: E402

S = RunState
RARE = S.ROLLED_BACK
RARE_RUNS = 5
GOAL = 1.3
DEPLOYED_PATH = [S.PREPARED, S.SUBMITTED, S.COMPLETED, S.REGISTERED, S.DEPLOYING, S.DEPLOYED]


def write_run(ledger: Ledger, index: int, end: RunState) -> str | None:
    """One run as the flow leaves it: its job named, and its model and endpoint when deployed.
    Returns its job's name, if it got that far."""
    run, _ = ledger.receive(Upload("datasets", f"team-{index % 7}/chats-{index}.jsonl", uuid.uuid4().hex), "received")
    if end == S.REJECTED:
        ledger.advance(run, S.REJECTED, "rejected", reason="line 3: not JSON")
        return None
    run = ledger.advance(run, S.PREPARED, "prepared", details={"report": {"rows": 100 + index}})
    job = f"ft-{run.run_id}"
    run = ledger.advance(run, S.SUBMITTED, "submitted", job_name=job)
    if end == S.FAILED:
        ledger.advance(run, S.FAILED, "job failed", reason="out of memory")
        return job
    run = ledger.advance(run, S.COMPLETED, "completed")
    run = ledger.advance(run, S.REGISTERED, "registered", model_name="chat", model_version=str(index))
    run = ledger.advance(run, S.DEPLOYING, "deploying", endpoint_name=f"chat-{index % 50}", deployment_name="blue")
    run = ledger.advance(run, S.DEPLOYED, "deployed", endpoint_url="https://chat.example/score")
    ledger.advance(run, end, f"now {end}")
    return job


def fill(ledger: Ledger, start: int, stop: int) -> list[str]:
    """Runs `start` to `stop`, the rare ones among the first; returns the jobs' names."""

    def one(index: int) -> str | None:
        end = RARE if index < RARE_RUNS else random.Random(index).choice([S.REJECTED, S.FAILED, S.TORN_DOWN])
        return write_run(ledger, index, end)

    with ThreadPoolExecutor(4) as pool:  # Azurite answers while this process writes the next
        return [job for job in pool.map(one, range(start, stop)) if job]


def median_ms(call: Callable[[], Any], calls: int) -> float:
    call()  # warm
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return round(1000 * statistics.median(times), 2)


def measure(ledger: Ledger, jobs: list[str], calls: int) -> dict[str, float]:
    from functions.status import run_status

    route = run_status.build().get_user_function()
    request = func.HttpRequest(method="GET", url="http://localhost/api/runs", params={"limit": "20"}, body=b"")
    pick = random.Random(len(jobs))

    def by_job() -> None:
        assert ledger.by_job(pick.choice(jobs)) is not None

    def by_state() -> None:
        assert len(ledger.by_state(RARE)) == RARE_RUNS

    def recent() -> None:
        assert len(ledger.recent(20)) == 20

    def status_route() -> None:
        response = route(request)
        assert response.status_code == 200 and len(json.loads(response.get_body())["runs"]) == 20

    queries = {"by_job": by_job, f"by_state({RARE})": by_state, "recent(20)": recent,
               "GET /api/runs?limit=20": status_route}  # fmt: skip
    return {name: median_ms(query, calls) for name, query in queries.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=10000)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    azurite = start_azurite()
    try:
        os.environ["AzureWebJobsStorage"] = azurite.connection_string  # noqa: SIM112
        ledger = open_ledger(get_settings())  # the app's own table, as the status route reads it
        started = time.perf_counter()
        jobs = fill(ledger, 0, args.small)
        print(f"wrote {args.small} runs in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        small = measure(ledger, jobs, args.calls)
        started = time.perf_counter()
        jobs += fill(ledger, args.small, args.large)
        print(f"wrote {args.large - args.small} more in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        large = measure(ledger, jobs, args.calls)
        rows = sum(1 for _ in ledger._table.list_entities(select=["RowKey"]))
    finally:
        azurite.stop()
    ratios = {name: round(large[name] / small[name], 2) for name in small}
    met = all(ratio <= GOAL for ratio in ratios.values())
    print(json.dumps({f"{args.small}_runs_ms": small, f"{args.large}_runs_ms": large,
                      f"ratio_{args.large}_over_{args.small}": ratios, "table_rows_at_large": rows,
                      "goal": f"every ratio <= {GOAL}", "met": met}, indent=2))  # fmt: skip
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
