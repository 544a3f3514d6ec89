"""The ledger's queries at 1,000 and at 10,000 runs, on a real Azurite: each should cost the same
at both sizes, since each is a point read or a bounded range of keys (see shared/ledger.py).

Runs are written through the ledger itself, in the shapes the flow leaves: most end rejected,
failed or torn down after a full deployment; a fixed few are rolled back (the rare state queried).
Measured at each size, median of N calls: `by_job` (a job picked at random), `by_state` for the
rare state, `recent(20)`, and `GET /api/runs?limit=20` through the function itself; and how many
requests each call sends (the same at both sizes, by design).

Azurite answers every query by filtering its whole table entity by entity, then sorting every
row that matched, and only then applying $top (LokiTableMetadataStore.queryTableEntities), where
Azure serves a PartitionKey and RowKey range from its index and stops at $top. So on Azurite a
key-range query costs more as the table grows, whatever it returns: `recent:` matches every run.
The bench times each call's key-range query alone, as the ledger sends it, at each size, and
reports each call's time both as measured and net of that query (the rest: its point reads and
the ledger's own work). Goal: each 10k / 1k ratio of the net times <= 1.3, and the same requests
per call; the measured ratios and the queries' own times are printed beside them.
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
from itertools import islice
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import azure.functions as func  # noqa: E402
from azure.data.tables import TableClient  # noqa: E402

from shared.dev.azurite import start_azurite  # noqa: E402
from shared.ledger import Ledger, RunState, Upload, _key_range, open_ledger  # noqa: E402
from shared.settings import get_settings  # noqa: E402
from shared.vocabulary import RUNS_TABLE  # noqa: E402

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


class Sent:
    """The requests a table client sends (its `raw_response_hook`), to count them per call."""

    def __init__(self) -> None:
        self.urls: list[str] = []

    def __call__(self, response: Any) -> None:
        self.urls.append(response.http_request.url)

    def count(self, call: Callable[[], Any]) -> tuple[int, int]:
        """(key-range queries, requests in all) that one `call` sends."""
        self.urls.clear()
        call()
        return sum(1 for url in self.urls if "$filter=" in url), len(self.urls)


def measure(ledger: Ledger, sent: Sent, jobs: list[str], calls: int) -> dict[str, Any]:
    """Each call's median time, requests and key-range queries at the ledger's present size, and
    the median time of its key-range query alone (as the ledger sends it)."""
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

    def status_route() -> None:  # the app's own ledger: as recent(20), counted there
        response = route(request)
        assert response.status_code == 200 and len(json.loads(response.get_body())["runs"]) == 20

    def key_range(prefix: str, limit: int | None) -> Callable[[], Any]:
        query, parameters = _key_range(prefix)
        return lambda: list(islice(ledger._table.query_entities(query, parameters=parameters, select=["RunId"],
                                                                 results_per_page=limit), limit))  # fmt: skip

    newest = key_range("recent:", 20)
    queries = {  # the call, the call whose requests it sends (counted on this ledger), its key range
        "by_job": (by_job, by_job, None),
        f"by_state({RARE})": (by_state, by_state, key_range(f"state:{RARE}:", None)),
        "recent(20)": (recent, recent, newest),
        "GET /api/runs?limit=20": (status_route, recent, newest),
    }
    measured = {}
    for name, (query, counted, its_range) in queries.items():
        ranges, requests = sent.count(counted)
        ms = median_ms(query, calls)
        range_ms = median_ms(its_range, calls) if its_range else 0.0
        measured[name] = {"ms": ms, "requests": requests, "key_range_queries": ranges,
                          "its_key_range_query_ms": range_ms, "ms_net_of_it": round(ms - range_ms, 2)}  # fmt: skip
    return measured


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=10000)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    azurite = start_azurite()
    try:
        os.environ["AzureWebJobsStorage"] = azurite.connection_string  # noqa: SIM112
        open_ledger(get_settings())  # the app's own table, as the status route reads it, marked as migrated
        sent = Sent()
        ledger = Ledger(TableClient.from_connection_string(azurite.connection_string, RUNS_TABLE,
                                                           raw_response_hook=sent))  # fmt: skip
        started = time.perf_counter()
        jobs = fill(ledger, 0, args.small)
        print(f"wrote {args.small} runs in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        small = measure(ledger, sent, jobs, args.calls)
        started = time.perf_counter()
        jobs += fill(ledger, args.small, args.large)
        print(f"wrote {args.large - args.small} more in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        large = measure(ledger, sent, jobs, args.calls)
        rows = sum(1 for _ in ledger._table.list_entities(select=["RowKey"]))
    finally:
        azurite.stop()
    ratios, goals = {}, {}
    for name, at_small in small.items():
        at_large = large[name]
        ratios[name] = {"net": round(at_large["ms_net_of_it"] / at_small["ms_net_of_it"], 2),
                        "measured": round(at_large["ms"] / at_small["ms"], 2)}  # fmt: skip
        goals[f"{name}: net ratio <= {GOAL}"] = ratios[name]["net"] <= GOAL
        goals[f"{name}: same requests"] = at_large["requests"] == at_small["requests"]
    print(json.dumps({f"{args.small}_runs": small, f"{args.large}_runs": large,
                      f"ratio_{args.large}_over_{args.small}": ratios, "table_rows_at_large": rows,
                      "goals_met": goals}, indent=2))  # fmt: skip
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
