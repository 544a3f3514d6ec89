"""The run ledger against a real Azurite: transitions, races, queries, persistence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from azure.core import MatchConditions
from azure.data.tables import TableClient, TableServiceClient

from shared.dev.azurite import start_azurite
from shared.ledger import (
    FAILURE_STATES,
    PARTITION,
    TRANSITIONS,
    IllegalTransition,
    Ledger,
    Run,
    RunChanged,
    RunNotFound,
    RunState,
    Upload,
)

S = RunState
REPO = Path(__file__).resolve().parent.parent


def _path_to(state: RunState) -> list[RunState]:
    """The shortest chain of legal transitions from `received` to `state`."""
    queue: deque[list[RunState]] = deque([[S.RECEIVED]])
    while queue:
        path = queue.popleft()
        if path[-1] == state:
            return path[1:]
        queue.extend([*path, nxt] for nxt in sorted(TRANSITIONS[path[-1]]) if nxt not in path)
    raise AssertionError(f"{state} is unreachable")


def _upload(name: str = "chats.jsonl", version: str = "0x8DC0FFEE") -> Upload:
    return Upload("datasets", name, version)


def _advance(ledger: Ledger, run: Run, target: RunState) -> Run:
    reason = f"because {target}" if target in FAILURE_STATES else None
    return ledger.advance(run, target, f"moved to {target}", reason=reason)


def _run_in(ledger: Ledger, state: RunState, name: str) -> Run:
    run, _ = ledger.receive(_upload(name), "received")
    for step in _path_to(state):
        run = _advance(ledger, run, step)
    return run


def test_every_state_is_reachable_and_every_run_can_end() -> None:
    final = {state for state, nxt in TRANSITIONS.items() if not nxt}
    assert final == {S.REJECTED, S.FAILED, S.CANCELED, S.TORN_DOWN}
    for state in RunState:
        _path_to(state)


@pytest.mark.parametrize(
    ("source", "target"), [(s, t) for s, targets in TRANSITIONS.items() for t in sorted(targets)], ids=str
)
def test_every_legal_transition_is_recorded(ledger: Ledger, source: RunState, target: RunState) -> None:
    run = _run_in(ledger, source, f"{source}-{target}.jsonl")
    moved = _advance(ledger, run, target)
    assert moved.state == target
    assert set(moved.state_times) == {S.RECEIVED, *_path_to(source), target}
    assert moved.state_times[target] >= moved.state_times[S.RECEIVED]
    history = ledger.history(run.run_id)
    assert [entry.state for entry in history] == [S.RECEIVED, *_path_to(source), target]
    if target in FAILURE_STATES:
        assert moved.reason == f"because {target}"
        assert history[-1].message.endswith(f": because {target}")


def test_every_illegal_transition_is_refused_with_a_clear_error(ledger: Ledger) -> None:
    for source in RunState:
        run = _run_in(ledger, source, f"illegal-{source}.jsonl")
        for target in set(RunState) - TRANSITIONS[source]:
            with pytest.raises(IllegalTransition, match=f"is {source}; it cannot become {target}"):
                ledger.advance(run, target, "should not happen", reason="x")
        assert ledger.get(run.run_id) == run


def test_a_failure_needs_a_reason(ledger: Ledger) -> None:
    run, _ = ledger.receive(_upload(), "received")
    with pytest.raises(ValueError, match="needs a reason"):
        ledger.advance(run, S.REJECTED, "rejected")
    assert ledger.get(run.run_id).state == S.RECEIVED


def test_the_same_upload_maps_to_the_same_run(ledger: Ledger) -> None:
    first, created = ledger.receive(_upload(), "first delivery")
    again, created_again = ledger.receive(_upload(), "second delivery")
    other, _ = ledger.receive(_upload(version="0x8DBEEF"), "a new version of the blob")
    assert created and not created_again
    assert again.run_id == first.run_id
    assert other.run_id != first.run_id
    assert [entry.message for entry in ledger.history(first.run_id)] == ["first delivery"]


def test_run_ids_are_readable_and_valid_everywhere(ledger: Ledger) -> None:
    run_id = Upload("datasets", "team a/Ultra Chat (v2).jsonl.gz", "0x1").run_id
    assert run_id.startswith("ultra-chat-v2-")
    assert run_id.replace("-", "").isalnum() and run_id == run_id.lower()


def test_concurrent_receives_create_one_run(ledger: Ledger) -> None:
    results: list[bool] = []
    barrier = threading.Barrier(16)

    def deliver() -> None:
        barrier.wait()
        results.append(ledger.receive(_upload("race.jsonl"), "delivered")[1])

    threads = [threading.Thread(target=deliver) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 15 + [True]


def test_two_concurrent_writers_exactly_one_wins(ledger: Ledger) -> None:
    run = _run_in(ledger, S.PREPARED, "writers.jsonl")
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def submit(index: int) -> None:
        barrier.wait()
        try:
            ledger.advance(run, S.SUBMITTED, f"submitted by writer {index}", job_name=f"job-{index}")
            outcomes.append("won")
        except RunChanged:
            outcomes.append("lost")

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["lost"] * 7 + ["won"]
    final = ledger.get(run.run_id)
    submitted = [entry for entry in ledger.history(run.run_id) if entry.state == S.SUBMITTED]
    assert len(submitted) == 1
    assert final.job_name == f"job-{submitted[0].message.rsplit(' ', 1)[-1]}"


def test_a_stale_read_cannot_move_the_run(ledger: Ledger) -> None:
    stale = _run_in(ledger, S.SUBMITTED, "stale.jsonl")
    _advance(ledger, stale, S.RUNNING)
    with pytest.raises(RunChanged):
        ledger.advance(stale, S.COMPLETED, "from an old read")
    assert ledger.get(stale.run_id).state == S.RUNNING


def test_notes_append_history_without_changing_state(ledger: Ledger) -> None:
    run = _run_in(ledger, S.SUBMITTED, "notes.jsonl")
    threads = [threading.Thread(target=ledger.note, args=(run.run_id, f"note {i}")) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = ledger.get(run.run_id)
    assert after.state == S.SUBMITTED
    notes = sorted(entry.message for entry in ledger.history(run.run_id) if entry.message.startswith("note"))
    assert notes == [f"note {i}" for i in range(6)]


def test_facts_and_details_are_kept(ledger: Ledger) -> None:
    run = _run_in(ledger, S.PREPARED, "facts.jsonl")
    run = ledger.advance(run, S.SUBMITTED, "submitted", job_name="ft-facts", details={"report": {"rows": 10}})
    run = ledger.advance(run, S.RUNNING, "running", details={"metrics": {"loss": 1.5}})
    assert run.job_name == "ft-facts"
    assert run.details == {"report": {"rows": 10}, "metrics": {"loss": 1.5}}
    with pytest.raises(TypeError, match="unknown run facts: colour"):
        ledger.advance(run, S.COMPLETED, "done", colour="red")


def test_queries_by_id_state_job_blob_and_recency(ledger: Ledger) -> None:
    runs = [_run_in(ledger, S.RECEIVED, f"q{i}.jsonl") for i in range(5)]
    submitted = ledger.advance(_advance(ledger, runs[1], S.PREPARED), S.SUBMITTED, "submitted", job_name="ft-q1")
    assert ledger.get(runs[0].run_id).run_id == runs[0].run_id
    assert ledger.find("no-such-run") is None
    with pytest.raises(RunNotFound, match="no-such-run"):
        ledger.get("no-such-run")
    assert [r.run_id for r in ledger.by_state(S.SUBMITTED)] == [submitted.run_id]
    assert len(ledger.by_state(S.RECEIVED)) == 4
    assert ledger.by_job("ft-q1") == submitted
    assert ledger.by_job("ft-unknown") is None
    assert [r.run_id for r in ledger.by_blob("datasets", "q3.jsonl")] == [runs[3].run_id]
    assert [r.run_id for r in ledger.recent(limit=3)] == [r.run_id for r in reversed(runs)][:3]
    assert [r.run_id for r in ledger.recent(state=S.SUBMITTED)] == [submitted.run_id]


def test_records_survive_an_azurite_restart(tmp_path: Path) -> None:
    location = tmp_path / "azurite"
    server = start_azurite(location=location)
    try:
        table = TableServiceClient.from_connection_string(server.connection_string).create_table("runs")
        run = _run_in(Ledger(table), S.SUBMITTED, "persist.jsonl")
    finally:
        server.stop()
    restarted = start_azurite(location=location)
    try:
        table = TableServiceClient.from_connection_string(restarted.connection_string).get_table_client("runs")
        again = Ledger(table).get(run.run_id)
        assert again.state == S.SUBMITTED
        assert [entry.state for entry in Ledger(table).history(run.run_id)] == [S.RECEIVED, S.PREPARED, S.SUBMITTED]
    finally:
        restarted.stop()


# A ledger written by the code before the indexed layout (commit 41666f7): runs in several states,
# with facts, details, notes, a driver's claim, and an endpoint's rollout hold.
LAYOUT_1 = Path(__file__).parent / "data" / "ledger_layout1.json"


def _old_ledger(table: TableClient) -> list[dict[str, Any]]:
    entities = json.loads(LAYOUT_1.read_text())
    for entity in entities:
        row = {k: datetime.fromisoformat(v["DateTime"]) if isinstance(v, dict) else v for k, v in entity.items()}
        table.create_entity(row)
    return entities


def _old_runs(entities: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["PartitionKey"]: e for e in entities if e["RowKey"] == "run"}


def _rows(ledger: Ledger) -> list[dict[str, Any]]:
    return list(ledger._table.list_entities())


def test_a_ledger_in_the_old_layout_moves_in_place_and_answers_every_query(ledger: Ledger) -> None:
    entities = _old_ledger(ledger._table)
    old = _old_runs(entities)
    assert ledger.recent() == []  # nothing found before the move

    migration = ledger.migrate()
    assert (migration.copied, migration.found) == (len(old), 0)
    assert migration.removed == sum(1 for e in entities if e["PartitionKey"] in old)

    for run_id, entity in old.items():
        run = ledger.get(run_id)
        assert str(run.state) == entity["State"]
        assert run.upload == Upload(entity["Container"], entity["BlobName"], entity["UploadVersion"])
        assert run.created_at == datetime.fromisoformat(entity["CreatedAt"]["DateTime"])
        assert (run.job_name, run.endpoint_name, run.endpoint_url, run.reason, run.driver) == (
            entity.get("JobName"), entity.get("EndpointName"), entity.get("EndpointUrl"), entity.get("Reason"),
            entity.get("Driver"),
        )  # fmt: skip
        assert run.details == json.loads(entity.get("Details", "{}"))
        messages = sorted(
            (e["RowKey"], e["Message"]) for e in entities if e["PartitionKey"] == run_id and e["RowKey"] != "run"
        )
        assert [entry.message for entry in ledger.history(run_id)] == [message for _, message in messages]
        assert len(messages) == run.history_length

    newest_first = sorted(old, key=lambda run_id: old[run_id]["CreatedAt"]["DateTime"], reverse=True)
    assert [run.run_id for run in ledger.recent(limit=4)] == newest_first[:4]
    assert ledger.by_job("ft-sub") == ledger.get(next(i for i, e in old.items() if e.get("JobName") == "ft-sub"))
    on_chat = [i for i in newest_first if old[i].get("EndpointName") == "chat"]
    assert [run.run_id for run in ledger.by_endpoint("chat")] == on_chat
    assert [run.run_id for run in ledger.by_blob("datasets", "teams/support/a b.jsonl")] == [
        i for i, e in old.items() if e["BlobName"] == "teams/support/a b.jsonl"
    ]
    for state in {e["State"] for e in old.values()}:
        expected = [i for i in newest_first if old[i]["State"] == state]
        assert [run.run_id for run in ledger.by_state(S(state))] == expected

    # Nothing of the old layout is left but the endpoint's hold, which was never a run's.
    left = [(row["PartitionKey"], row["RowKey"]) for row in _rows(ledger) if row["PartitionKey"] != PARTITION]
    assert left == [("endpoint:chat", "rollout")]
    assert ledger.hold_endpoint("chat", "someone-else-000000000000", lambda holder: False) is not None

    # A migrated run moves on as any other, its indexes with it.
    submitted = ledger.by_job("ft-sub")
    assert submitted is not None
    running = ledger.advance(submitted, S.RUNNING, "started")
    assert [run.run_id for run in ledger.by_state(S.RUNNING)] == [running.run_id]
    assert ledger.by_state(S.SUBMITTED) == []

    again = ledger.migrate()
    assert (again.copied, again.found, again.removed, again.complete) == (0, 0, 0, True)


def test_a_run_the_version_before_moves_on_during_the_migration_is_moved_as_it_ends(ledger: Ledger) -> None:
    """During a deployment the app's version before can still write a run being migrated."""
    old = _old_runs(_old_ledger(ledger._table))
    run_id = next(i for i, e in old.items() if e["State"] == "prepared" or e["State"] == "received")
    table = ledger._table

    def the_version_before_advances() -> None:  # what its Ledger.advance wrote: run row and history row
        row = table.get_entity(run_id, "run")
        length, now = row["HistoryLength"], datetime.now(UTC)
        table.submit_transaction([
            ("update", {"PartitionKey": run_id, "RowKey": "run", "State": "rejected", "RejectedAt": now,
                        "UpdatedAt": now, "Reason": "late", "HistoryLength": length + 1},
             {"etag": row.metadata["etag"], "match_condition": MatchConditions.IfNotModified}),
            ("create", {"PartitionKey": run_id, "RowKey": f"history-{length:05d}", "At": now, "State": "rejected",
                        "Message": "rejected late"}),
        ])  # fmt: skip

    class WrittenAfterCopying(Ledger):
        writes = 1

        def _copy(self, moving: str, *args: Any) -> bool:
            copied = super()._copy(moving, *args)
            if moving == run_id and self.writes:
                self.writes -= 1
                the_version_before_advances()
            return copied

    WrittenAfterCopying(table).migrate()
    run = ledger.get(run_id)
    assert (run.state, run.reason) == (S.REJECTED, "late")
    assert [entry.message for entry in ledger.history(run_id)][-1] == "rejected late"
    assert [r.run_id for r in ledger.by_state(S.REJECTED) if r.run_id == run_id] == [run_id]
    assert run_id not in {r.run_id for r in ledger.by_state(S(old[run_id]["State"]))}  # no stale index row
    assert not list(table.query_entities("PartitionKey eq @run", parameters={"run": run_id}))


def test_a_migration_out_of_time_stops_unmarked_and_the_next_goes_on(ledger: Ledger) -> None:
    old = _old_runs(_old_ledger(ledger._table))
    stopped = ledger.migrate(budget_s=0)
    assert not stopped.complete and stopped.copied == 0
    ledger.ensure_layout()  # not marked: it goes on
    assert {run.run_id for run in ledger.recent(limit=50)} == set(old)


def test_migrations_killed_midway_or_run_side_by_side_copy_each_run_once(ledger: Ledger) -> None:
    entities = _old_ledger(ledger._table)
    old = _old_runs(entities)
    history_rows = sum(1 for e in entities if e["PartitionKey"] in old) - len(old)

    class KilledAfterCopying(Ledger):
        def _remove(self, *args: Any) -> bool:
            raise HandlerKilled

    with pytest.raises(HandlerKilled):
        KilledAfterCopying(ledger._table).migrate()  # one run copied, its old rows still there
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(Ledger(ledger._table).migrate())) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sum(result.copied for result in results) == len(old) - 1
    assert not [row for row in _rows(ledger) if row["RowKey"] == "run" or row["RowKey"].startswith("history-")]
    rows = _rows(ledger)
    assert sum(1 for row in rows if row["RowKey"].startswith("run:") and ":history-" not in row["RowKey"]) == len(old)
    assert sum(1 for row in rows if ":history-" in row["RowKey"]) == history_rows
    assert sum(1 for row in rows if row["RowKey"].startswith("recent:")) == len(old)


def test_a_marked_table_is_not_scanned_again(ledger: Ledger) -> None:
    ledger.ensure_layout()  # an empty table: marked at once
    _old_ledger(ledger._table)
    ledger.ensure_layout()
    assert ledger.recent() == []  # marked: the old rows were not looked for
    assert ledger.migrate().copied > 0  # the command still moves them


class HandlerKilled(BaseException):
    """Stands for the process dying: nothing after it runs, nothing catches it."""


def test_index_rows_follow_every_transition_and_leave_nothing_behind(ledger: Ledger) -> None:
    runs = {state: _run_in(ledger, state, f"index-{state}.jsonl") for state in RunState}
    runs[S.SUBMITTED] = ledger.advance(
        _run_in(ledger, S.PREPARED, "odd.jsonl"), S.SUBMITTED, "submitted", job_name="a job/with #odd?\nname"
    )
    assert ledger.by_job("a job/with #odd?\nname") == runs[S.SUBMITTED]
    index = [row for row in _rows(ledger) if not row["RowKey"].startswith("run:")]
    by_kind: dict[str, list[str]] = {}
    for row in index:
        by_kind.setdefault(row["RowKey"].split(":", 1)[0], []).append(row["RunId"])
    every_run = {run.run_id for run in runs.values()} | {run.run_id for run in ledger.recent(limit=100)}
    assert sorted(by_kind["recent"]) == sorted(by_kind["state"]) == sorted(by_kind["blob"]) == sorted(every_run)
    for state in RunState:
        assert {run.state for run in ledger.by_state(state)} <= {state}
    assert len(by_kind["job"]) == len({run.job_name for run in ledger.recent(limit=100) if run.job_name})


def test_the_migrate_command_moves_the_app_ledger_and_says_what_it_did(tmp_path: Path) -> None:
    server = start_azurite()
    try:
        service = TableServiceClient.from_connection_string(server.connection_string)
        old = _old_runs(_old_ledger(service.create_table("runs")))
        env = {**os.environ, "AzureWebJobsStorage": server.connection_string}

        def cli(*args: str) -> Any:
            done = subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=REPO, env=env, capture_output=True,
                                  text=True, timeout=120, check=True)  # fmt: skip
            return json.loads(done.stdout)

        moved = cli("migrate-ledger")
        assert (moved["copied"], moved["found"]) == (len(old), 0)
        assert {run["run_id"] for run in cli("status", "--limit", "50")["runs"]} == set(old)
        assert cli("migrate-ledger") == {"copied": 0, "found": 0, "removed": 0, "complete": True}
    finally:
        server.stop()
