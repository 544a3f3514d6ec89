"""The run ledger: one record per upload, in Azure Table Storage, so a user can always ask
"what happened to my upload?".

Layout in the table: every run lives in one partition, `runs`, because Table storage makes a
transaction of entities in one partition only. The row `run:<id>` holds a run's current state and
facts; rows `run:<id>:history-00000`, ... are its append-only history; index rows point at it:
`job:<job name>` (one per job), `state:<state>:<newest first>:<id>`, `recent:<newest first>:<id>`,
`endpoint:<endpoint>:<newest first>:<id>` and `blob:<blob digest>:<newest first>:<id>`, where
<newest first> is the run's creation time counted down, so a range of keys lists the newest runs
first. Every change writes the run row (conditional on its ETag), one history row, and moves the
index rows it affects, in a single transaction: two concurrent handlers cannot both move a run
forward, and neither the history nor an index ever disagrees with the state. Each query is a
point read or a bounded range of keys, however many runs the table holds.
Ledgers written before this layout (a partition per run) are moved into it by `migrate`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import lru_cache
from itertools import islice
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from azure.data.tables import TableClient, TableEntity

    from shared.settings import Settings

log = logging.getLogger(__name__)

PARTITION = "runs"
# Marks a table whose runs are all in this layout (see `ensure_layout`).
LAYOUT_ROW = "layout"
LAYOUT_VERSION = 2
_HISTORY = "history-"
_OLD_RUN_ROW = "run"  # a run's row in the layout before this one, in a partition of its own
_TRANSACTION_ROWS = 100  # the most entities Table storage takes in one transaction


class RunState(StrEnum):
    RECEIVED = "received"
    REJECTED = "rejected"
    PREPARED = "prepared"
    SUBMITTED = "submitted"
    RUNNING = "running"
    FAILED = "failed"
    CANCELED = "canceled"
    COMPLETED = "completed"
    REGISTERED = "registered"
    DEPLOYING = "deploying"
    ROLLING_OUT = "rolling_out"
    DEPLOYED = "deployed"
    REFUSED = "refused"
    SUPERSEDED = "superseded"
    ROLLED_BACK = "rolled_back"
    DEPLOY_FAILED = "deploy_failed"
    TORN_DOWN = "torn_down"

    @property
    def column(self) -> str:
        """The table column holding when the run entered this state, e.g. `DeployFailedAt`."""
        return "".join(part.capitalize() for part in self.value.split("_")) + "At"


S = RunState
# A job may report Completed, Failed or Canceled without ever reporting Running, and preparation
# or submission can fail before a job exists. A deployment that passes the evaluation gate rolls
# out (or, with nothing else on its endpoint, serves at once); a newer one supersedes it, a
# rollback brings it back, and it is torn down when its endpoint or its deployment is deleted. A
# refused or failed deployment may leave something behind for the janitor to tear down.
TRANSITIONS: Mapping[RunState, frozenset[RunState]] = {
    S.RECEIVED: frozenset({S.PREPARED, S.REJECTED, S.FAILED}),
    S.PREPARED: frozenset({S.SUBMITTED, S.FAILED}),
    S.SUBMITTED: frozenset({S.RUNNING, S.COMPLETED, S.FAILED, S.CANCELED}),
    S.RUNNING: frozenset({S.COMPLETED, S.FAILED, S.CANCELED}),
    S.COMPLETED: frozenset({S.REGISTERED, S.DEPLOY_FAILED}),
    S.REGISTERED: frozenset({S.DEPLOYING, S.DEPLOY_FAILED}),
    S.DEPLOYING: frozenset({S.ROLLING_OUT, S.DEPLOYED, S.REFUSED, S.DEPLOY_FAILED}),
    S.ROLLING_OUT: frozenset({S.DEPLOYED, S.ROLLED_BACK, S.DEPLOY_FAILED, S.TORN_DOWN}),
    S.DEPLOYED: frozenset({S.SUPERSEDED, S.ROLLED_BACK, S.TORN_DOWN}),
    S.SUPERSEDED: frozenset({S.DEPLOYED, S.TORN_DOWN}),
    S.ROLLED_BACK: frozenset({S.TORN_DOWN}),
    S.REFUSED: frozenset({S.TORN_DOWN}),
    S.DEPLOY_FAILED: frozenset({S.TORN_DOWN}),
    S.REJECTED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELED: frozenset(),
    S.TORN_DOWN: frozenset(),
}
FAILURE_STATES = frozenset({S.REJECTED, S.FAILED, S.CANCELED, S.REFUSED, S.DEPLOY_FAILED})

# Facts a transition may record, by attribute name and table column.
_FACT_COLUMNS = {
    "job_name": "JobName",
    "model_name": "ModelName",
    "model_version": "ModelVersion",
    "endpoint_name": "EndpointName",
    "deployment_name": "DeploymentName",
    "endpoint_url": "EndpointUrl",
}
_ROLLOUT_ROW = "rollout"


class LedgerError(Exception):
    pass


class RunNotFound(LedgerError):
    def __init__(self, run_id: str) -> None:
        super().__init__(f"no run with id {run_id!r}")
        self.run_id = run_id


class IllegalTransition(LedgerError):
    def __init__(self, run_id: str, current: RunState, target: RunState) -> None:
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "nothing (it is final)"
        super().__init__(
            f"run {run_id} is {current}; it cannot become {target} (from {current} it can become: {allowed})"
        )
        self.run_id, self.current, self.target = run_id, current, target


class RunChanged(LedgerError):
    """Someone else changed the run since it was read: re-read it and decide again."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id} was changed by another handler since it was read")
        self.run_id = run_id


@dataclass(frozen=True)
class Upload:
    """What identifies one upload: the same blob content delivered twice is the same upload."""

    container: str
    blob_name: str
    version: str  # the blob's ETag, or a sha256 of its content

    @property
    def run_id(self) -> str:
        digest = hashlib.sha256(f"{self.container}/{self.blob_name}@{self.version}".encode()).hexdigest()
        stem = self.blob_name.rsplit("/", 1)[-1].split(".", 1)[0].lower()
        slug = re.sub(r"[^a-z0-9]+", "-", stem).strip("-")[:24].strip("-")
        return f"{slug or 'upload'}-{digest[:12]}"


# What `Upload.run_id` makes: a slug of the blob's name, then 12 hex digits.
_RUN_ID = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*-[0-9a-f]{12}")


def is_run_id(text: str) -> bool:
    return len(text) <= 40 and _RUN_ID.fullmatch(text) is not None


@dataclass(frozen=True)
class HistoryEntry:
    at: datetime
    state: RunState
    message: str


@dataclass(frozen=True)
class Run:
    run_id: str
    state: RunState
    upload: Upload
    created_at: datetime
    updated_at: datetime
    state_times: Mapping[RunState, datetime]
    reason: str | None = None
    job_name: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    endpoint_name: str | None = None
    deployment_name: str | None = None
    endpoint_url: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    history_length: int = 0
    etag: str = ""
    driver: str | None = None  # who drives its deployment now (see `claim`), until `driver_until`
    driver_until: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        """The run as users see it (status route, CLI): no ETag, times in ISO 8601."""
        return {
            "run_id": self.run_id,
            "state": str(self.state),
            "upload": {
                "container": self.upload.container,
                "blob_name": self.upload.blob_name,
                "version": self.upload.version,
            },
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "state_times": {str(state): at.isoformat() for state, at in self.state_times.items()},
            "reason": self.reason,
            "job_name": self.job_name,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "endpoint_name": self.endpoint_name,
            "deployment_name": self.deployment_name,
            "endpoint_url": self.endpoint_url,
            "details": dict(self.details),
        }


def _unchanged_since(etag: str | None, whole: bool = False) -> dict[str, Any]:
    """A merge (with `whole`, a replacement) that fails if the entity changed since it was read
    with this ETag."""
    from azure.core import MatchConditions
    from azure.data.tables import UpdateMode

    mode = UpdateMode.REPLACE if whole else UpdateMode.MERGE
    return {"mode": mode, "etag": etag, "match_condition": MatchConditions.IfNotModified}


def _endpoint_partition(endpoint: str) -> str:
    """Where an endpoint's own row lives: ':' is in no run id, so no run's partition is this."""
    return f"endpoint:{endpoint}"


def _now() -> datetime:
    return datetime.now(UTC)


def run_key(run_id: str) -> str:
    return f"run:{run_id}"


def history_key(run_id: str, index: int) -> str:
    return f"{run_key(run_id)}:{_HISTORY}{index:05d}"


def _history_row(run_id: str, index: int, at: datetime, state: RunState, message: str) -> dict[str, Any]:
    return {
        "PartitionKey": PARTITION,
        "RowKey": history_key(run_id, index),
        "RunId": run_id,
        "At": at,
        "State": str(state),
        "Message": message,
    }


_PLAIN_KEY_PART = re.compile(r"[A-Za-z0-9._-]{1,200}")


def _key_part(name: str) -> str:
    """A job's or endpoint's name as a part of a RowKey: as it is when it holds only letters,
    digits, '.', '_' and '-' (as Azure ML's names do); else a digest, since a key may not hold
    '/', '\\', '#', '?' or control characters, ':' separates its parts, and '%' trips the service."""
    if _PLAIN_KEY_PART.fullmatch(name):
        return name
    return "~" + hashlib.sha256(name.encode()).hexdigest()[:32]


def _blob_part(container: str, blob_name: str) -> str:
    """A blob's part of a key: a digest, since a blob's name can be longer than a whole key."""
    return hashlib.sha256(f"{container}/{blob_name}".encode()).hexdigest()[:32]


_LATEST = datetime(9999, 1, 1, tzinfo=UTC)


def _newest_first(created_at: datetime) -> str:
    """Microseconds from `created_at` to year 9999: later runs get smaller keys, so they sort first."""
    return f"{(_LATEST - created_at) // timedelta(microseconds=1):018d}"


def _index_keys(run: Run) -> set[str]:
    """The index rows that point at `run` as it is."""
    order = f"{_newest_first(run.created_at)}:{run.run_id}"
    keys = {
        f"recent:{order}",
        f"state:{run.state}:{order}",
        f"blob:{_blob_part(run.upload.container, run.upload.blob_name)}:{order}",
    }
    if run.job_name:
        keys.add(f"job:{_key_part(run.job_name)}")
    if run.endpoint_name:
        keys.add(f"endpoint:{_key_part(run.endpoint_name)}:{order}")
    return keys


def _index_moves(before: Run | None, after: Run) -> list[tuple[str, dict[str, Any]]]:
    """The transaction operations that make the index rows point at `after` instead of `before`."""
    old = _index_keys(before) if before else set()
    new = _index_keys(after)
    return [
        *(("delete", {"PartitionKey": PARTITION, "RowKey": key}) for key in sorted(old - new)),
        *(("upsert", {"PartitionKey": PARTITION, "RowKey": key, "RunId": after.run_id}) for key in sorted(new - old)),
    ]


@dataclass(frozen=True)
class Tell:
    """A lifecycle event to tell other systems about a change of a run: its type and data."""

    event_type: str
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Told:
    """A lifecycle event recorded with its change and not yet sent, with the run's state then."""

    key: str
    event_id: str  # the same however often it is sent: receivers drop duplicates by it
    run_id: str
    event_type: str
    at: datetime | None  # when the change happened (None: recorded by a version before it was kept)
    state: str
    reason: str | None
    upload: str
    data: dict[str, Any]


def _outbox_row(run: Run, history_index: int, at: datetime, tell: Tell) -> tuple[str, dict[str, Any]]:
    """The operation recording `tell` about `run` (as the change at `at` leaves it), in the
    change's own transaction; keyed by the history row of the change, so each change tells once,
    and a repeat is the same event, time included."""
    event_id = f"{run.run_id}:{history_index:05d}"
    return (
        "create",
        {
            "PartitionKey": PARTITION,
            "RowKey": f"outbox:{event_id}",
            "EventId": event_id,
            "RunId": run.run_id,
            "EventType": tell.event_type,
            "At": at,
            "State": str(run.state),
            "Reason": run.reason or "",
            "Upload": f"{run.upload.container}/{run.upload.blob_name}",
            "Data": json.dumps(dict(tell.data), default=str),
        },
    )


def _key_range(prefix: str) -> tuple[str, dict[str, Any]]:
    """A query for the rows whose keys start with `prefix` (';' is the character after ':')."""
    return (
        "PartitionKey eq @partition and RowKey gt @first and RowKey lt @last",
        {"partition": PARTITION, "first": prefix, "last": prefix[:-1] + ";"},
    )


def _run_from_entity(entity: Mapping[str, Any], etag: str) -> Run:
    state_times = {state: entity[state.column] for state in RunState if entity.get(state.column)}
    return Run(
        run_id=entity["RunId"],
        state=RunState(entity["State"]),
        upload=Upload(entity["Container"], entity["BlobName"], entity["UploadVersion"]),
        created_at=entity["CreatedAt"],
        updated_at=entity["UpdatedAt"],
        state_times=state_times,
        reason=entity.get("Reason") or None,
        details=json.loads(entity.get("Details") or "{}"),
        history_length=int(entity.get("HistoryLength", 0)),
        etag=etag,
        driver=entity.get("Driver") or None,
        driver_until=entity.get("DriverUntil") or None,
        **{attr: entity.get(column) or None for attr, column in _FACT_COLUMNS.items()},
    )


def _is_error(error: Exception, *codes: str) -> bool:
    return getattr(error, "error_code", None) in codes


class Ledger:
    """Run records in one Azure table. Safe to share between threads and handlers."""

    def __init__(self, table: TableClient) -> None:
        self._table = table

    def receive(self, upload: Upload, message: str) -> tuple[Run, bool]:
        """The run for this upload, created in state `received` if it is new.
        Returns (run, created): a redelivered upload gets its existing run and created=False."""
        from azure.core.exceptions import ResourceExistsError
        from azure.data.tables import TableTransactionError

        run_id, now = upload.run_id, _now()
        entity = {
            "PartitionKey": PARTITION,
            "RowKey": run_key(run_id),
            "RunId": run_id,
            "State": str(S.RECEIVED),
            "Container": upload.container,
            "BlobName": upload.blob_name,
            "UploadVersion": upload.version,
            "CreatedAt": now,
            "UpdatedAt": now,
            S.RECEIVED.column: now,
            "HistoryLength": 1,
        }
        new = Run(run_id, S.RECEIVED, upload, now, now, {S.RECEIVED: now})
        try:
            self._table.submit_transaction(
                [
                    ("create", entity),
                    ("create", _history_row(run_id, 0, now, S.RECEIVED, message)),
                    *_index_moves(None, new),
                ]
            )
        except (TableTransactionError, ResourceExistsError) as error:
            if not _is_error(error, "EntityAlreadyExists"):
                raise
            return self.get(run_id), False
        return self.get(run_id), True

    def find(self, run_id: str) -> Run | None:
        """The run, or None: also for anything that cannot be a run id (never sent to storage)."""
        from azure.core.exceptions import ResourceNotFoundError

        if not is_run_id(run_id):
            return None
        try:
            entity = self._table.get_entity(PARTITION, run_key(run_id))
        except ResourceNotFoundError:
            return None
        return _run_from_entity(entity, str(entity.metadata["etag"]))

    def get(self, run_id: str) -> Run:
        run = self.find(run_id)
        if run is None:
            raise RunNotFound(run_id)
        return run

    def _indexed(self, prefix: str, keep: Callable[[Run], bool], limit: int | None = None) -> list[Run]:
        """The runs the index rows under `prefix` point at, in key order (at most `limit`), that
        `keep` still holds for when read (a run may have moved on since its index row was read)."""
        query, parameters = _key_range(prefix)
        rows = self._table.query_entities(query, parameters=parameters, select=["RunId"], results_per_page=limit)
        runs = (self.find(row["RunId"]) for row in islice(rows, limit))
        return [run for run in runs if run is not None and keep(run)]

    def by_state(self, state: RunState) -> list[Run]:
        """Every run in this state, newest first."""
        return self._indexed(f"state:{state}:", lambda run: run.state == state)

    def by_job(self, job_name: str) -> Run | None:
        """The run whose backend job has this name (job names are unique per run)."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            row = self._table.get_entity(PARTITION, f"job:{_key_part(job_name)}", select=["RunId"])
        except ResourceNotFoundError:
            return None
        run = self.find(row["RunId"])
        return run if run is not None and run.job_name == job_name else None

    def by_endpoint(self, endpoint: str) -> list[Run]:
        """Every run deployed (or being deployed) to this endpoint, newest first."""
        return self._indexed(f"endpoint:{_key_part(endpoint)}:", lambda run: run.endpoint_name == endpoint)

    def by_blob(self, container: str, blob_name: str) -> list[Run]:
        """Every run made from uploads of this blob, newest first."""
        return self._indexed(
            f"blob:{_blob_part(container, blob_name)}:",
            lambda run: (run.upload.container, run.upload.blob_name) == (container, blob_name),
        )

    def recent(self, limit: int = 20, state: RunState | None = None) -> list[Run]:
        """The newest runs first, optionally only those in one state."""
        if state is None:
            return self._indexed("recent:", lambda run: True, limit)
        return self._indexed(f"state:{state}:", lambda run: run.state == state, limit)

    def history(self, run_id: str) -> list[HistoryEntry]:
        query, parameters = _key_range(f"{run_key(run_id)}:")
        rows = self._table.query_entities(query, parameters=parameters)
        entries = [HistoryEntry(row["At"], RunState(row["State"]), row["Message"]) for row in rows]
        return sorted(entries, key=lambda entry: entry.at)

    def advance(
        self,
        run: Run,
        target: RunState,
        message: str,
        *,
        reason: str | None = None,
        details: Mapping[str, Any] | None = None,
        tell: Tell | None = None,
        **facts: str,
    ) -> Run:
        """Move `run` (as read, with its ETag) to `target`, recording `message` in its history and,
        with `tell`, the lifecycle event to send about it (in the same transaction: see `outbox`).

        Raises IllegalTransition when the state machine forbids it, RunChanged when another
        handler changed the run since it was read. `reason` is required for failure states;
        `details` is merged into the run's details; `facts` sets job/model/endpoint names.
        """
        if target not in TRANSITIONS[run.state]:
            raise IllegalTransition(run.run_id, run.state, target)
        if target in FAILURE_STATES and not reason:
            raise ValueError(f"moving run {run.run_id} to {target} needs a reason a user can read")
        unknown = facts.keys() - _FACT_COLUMNS.keys()
        if unknown:
            raise TypeError(f"unknown run facts: {', '.join(sorted(unknown))}")
        now = _now()
        changes: dict[str, Any] = {
            "PartitionKey": PARTITION,
            "RowKey": run_key(run.run_id),
            "State": str(target),
            "UpdatedAt": now,
            target.column: now,
            "HistoryLength": run.history_length + 1,
            **{_FACT_COLUMNS[name]: value for name, value in facts.items()},
        }
        if reason:
            changes["Reason"] = reason
        if details:
            changes["Details"] = json.dumps({**run.details, **details}, default=str)
        history_message = f"{message}: {reason}" if reason else message
        history_row = _history_row(run.run_id, run.history_length, now, target, history_message)
        # Only the state and these two facts are indexed.
        job, endpoint = facts.get("job_name", run.job_name), facts.get("endpoint_name", run.endpoint_name)
        moved = replace(run, state=target, job_name=job, endpoint_name=endpoint, reason=reason or run.reason)
        told = [_outbox_row(moved, run.history_length, now, tell)] if tell else []
        self._write(run, changes, history_row, [*_index_moves(run, moved), *told])
        return self.get(run.run_id)

    def claim(self, run: Run, holder: str, ttl: timedelta) -> Run | None:
        """Make `holder` the one driver of the run (as read) for `ttl`, or renew its claim. None
        when another holder's claim is live: that one drives, this one stays out. A crashed
        driver's claim lapses. Raises RunChanged when the run changed since it was read."""
        from azure.core.exceptions import ResourceModifiedError

        now = _now()
        if run.driver and run.driver != holder and run.driver_until and run.driver_until > now:
            return None
        changes = {"PartitionKey": PARTITION, "RowKey": run_key(run.run_id), "Driver": holder, "DriverUntil": now + ttl}
        try:
            self._table.update_entity(changes, **_unchanged_since(run.etag))
        except ResourceModifiedError:
            raise RunChanged(run.run_id) from None
        return self.get(run.run_id)

    def release(self, run_id: str, holder: str) -> None:
        """End `holder`'s claim, if it is still its own (best effort: a claim also lapses)."""
        from azure.core.exceptions import HttpResponseError

        run = self.find(run_id)
        if run is None or run.driver != holder:
            return
        changes = {"PartitionKey": PARTITION, "RowKey": run_key(run_id), "Driver": "", "DriverUntil": _now()}
        # Changed meanwhile (by another holder after a lapse): then the claim simply lapses.
        with suppress(HttpResponseError):
            self._table.update_entity(changes, **_unchanged_since(run.etag))

    def hold_endpoint(self, endpoint: str, run_id: str, lapsed: Callable[[str], bool]) -> str | None:
        """Make `run_id` the one run that changes `endpoint`'s traffic, from its evaluation until
        its rollout ends; None when it holds it now, else the run that does. A holder for which
        `lapsed` is true (its rollout ended, however) is replaced."""
        from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError

        key = {"PartitionKey": _endpoint_partition(endpoint), "RowKey": _ROLLOUT_ROW}
        for _ in range(10):
            try:
                entity = self._table.get_entity(key["PartitionKey"], _ROLLOUT_ROW)
            except ResourceNotFoundError:
                with suppress(ResourceExistsError):
                    self._table.create_entity({**key, "Holder": run_id})
                    return None
                continue
            holder = entity.get("Holder") or ""
            if holder == run_id:
                return None
            if holder and not lapsed(holder):
                return holder
            with suppress(ResourceModifiedError):
                self._table.update_entity({**key, "Holder": run_id}, **_unchanged_since(entity.metadata["etag"]))
                return None
        raise RunChanged(run_id)

    def free_endpoint(self, endpoint: str, run_id: str) -> None:
        """End `run_id`'s hold on `endpoint`, if it is still its own."""
        from azure.core.exceptions import HttpResponseError

        with suppress(HttpResponseError):
            entity = self._table.get_entity(_endpoint_partition(endpoint), _ROLLOUT_ROW)
            if entity.get("Holder") == run_id:
                self._table.update_entity({**entity, "Holder": ""}, **_unchanged_since(entity.metadata["etag"]))

    def note(self, run_id: str, message: str, *, tell: Tell | None = None, attempts: int = 10) -> Run:
        """Append `message` to a run's history without changing its state (and, with `tell`, the
        lifecycle event to send about the run as it is)."""
        for _ in range(attempts):
            run = self.get(run_id)
            now = _now()
            changes = {
                "PartitionKey": PARTITION,
                "RowKey": run_key(run_id),
                "UpdatedAt": now,
                "HistoryLength": run.history_length + 1,
            }
            try:
                told = [_outbox_row(run, run.history_length, now, tell)] if tell else []
                self._write(run, changes, _history_row(run_id, run.history_length, now, run.state, message), told)
            except RunChanged:
                continue
            return self.get(run_id)
        raise RunChanged(run_id)

    def outbox(self, run_id: str | None = None) -> list[Told]:
        """The lifecycle events recorded and not yet sent (one run's, or every run's), oldest
        first for each run. Each was written in the transaction of the change it tells of, so none
        is lost however a handler dies; `told` removes one once it is sent."""
        query, parameters = _key_range(f"outbox:{run_id}:" if run_id else "outbox:")
        return [
            Told(
                row["RowKey"],
                row["EventId"],
                row["RunId"],
                row["EventType"],
                row.get("At"),
                row["State"],
                row.get("Reason") or None,
                row["Upload"],
                json.loads(row["Data"]),
            )
            for row in self._table.query_entities(query, parameters=parameters)
        ]

    def told(self, entry: Told) -> None:
        self._table.delete_entity(PARTITION, entry.key)  # no error when a concurrent sender did it

    def _write(
        self,
        run: Run,
        changes: dict[str, Any],
        history_row: dict[str, Any],
        also: list[tuple[str, dict[str, Any]]],  # the rest of the change: index rows, its outbox row
    ) -> None:
        from azure.data.tables import TableTransactionError

        try:
            self._table.submit_transaction(
                [("update", changes, _unchanged_since(run.etag)), ("create", history_row), *also]
            )
        except TableTransactionError as error:
            # A concurrent writer either changed the run row (ETag mismatch) or wrote the same
            # history row first: either way this handler lost the race.
            if _is_error(error, "UpdateConditionNotSatisfied", "EntityAlreadyExists"):
                raise RunChanged(run.run_id) from error
            raise

    def migrate(self, budget_s: float | None = None) -> Migration:
        """Move the runs written in the layout before this one (a partition per run, holding the
        rows `run` and `history-NNNNN`) into this one, then mark the table as migrated. With
        `budget_s`, stop after about that long, unmarked: the next migration goes on.

        Idempotent, and safe beside another migration or a handler of the version before still
        writing: a run's history is copied first, then its row with its index rows in one
        transaction (so a run is either all here or not at all); its old rows are removed only if
        its old row is still as it was read, else it is read and copied again."""
        deadline = None if budget_s is None else time.monotonic() + budget_s
        copied = found = removed = 0
        for old in self._table.query_entities(
            "RowKey eq @row", parameters={"row": _OLD_RUN_ROW}, select=["PartitionKey"]
        ):
            if deadline is not None and time.monotonic() > deadline:
                return Migration(copied, found, removed, complete=False)
            moved, rows = self._move(old["PartitionKey"])
            copied, found, removed = copied + moved, found + (not moved), removed + rows
        self._table.upsert_entity({"PartitionKey": PARTITION, "RowKey": LAYOUT_ROW, "Version": LAYOUT_VERSION})
        return Migration(copied, found, removed, complete=True)

    def ensure_layout(self, budget_s: float = 60) -> None:
        """Migrate a table not yet marked as in this layout (for up to `budget_s`, so that a
        handler that does it keeps its time for its own work): one point read once it is."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            version = self._table.get_entity(PARTITION, LAYOUT_ROW).get("Version")
        except ResourceNotFoundError:
            version = None
        if version == LAYOUT_VERSION:
            return
        migration = self.migrate(budget_s)
        if not migration.complete:
            log.warning("ledger partly moved into its indexed layout (%s); the next start goes on, or run "
                        "`python -m shared.cli migrate-ledger`", migration)  # fmt: skip
        elif migration.copied or migration.found:
            log.info("ledger moved into its indexed layout: %s", migration)

    def _move(self, run_id: str) -> tuple[bool, int]:
        """Move one run of the old layout: (whether this call copied it, old rows removed)."""
        from azure.core.exceptions import ResourceNotFoundError

        for _ in range(10):
            try:
                old = self._table.get_entity(run_id, _OLD_RUN_ROW)
            except ResourceNotFoundError:
                return False, 0  # a concurrent migration moved it
            history = list(
                self._table.query_entities(
                    "PartitionKey eq @run and RowKey gt @first and RowKey lt @last",
                    parameters={"run": run_id, "first": _HISTORY, "last": _HISTORY + "~"},
                )
            )
            copied = self._copy(run_id, old, history)
            if self._remove(run_id, old, history):
                return copied, 1 + len(history)
        raise RunChanged(run_id)

    def _copy(self, run_id: str, old: TableEntity, history: list[TableEntity]) -> bool:
        """Copy one run written in the old layout, or bring a copy made earlier up to it; False
        when the copy here was as far as it already (or further: this version moved it on)."""
        from azure.core.exceptions import ResourceExistsError, ResourceModifiedError
        from azure.data.tables import TableTransactionError

        here = self.find(run_id)
        if here is not None and here.history_length >= int(old.get("HistoryLength", 0)):
            return False
        rows = [
            {**row, "PartitionKey": PARTITION, "RunId": run_id,
             "RowKey": history_key(run_id, int(row["RowKey"].removeprefix(_HISTORY)))}
            for row in history
        ]  # fmt: skip
        for start in range(0, len(rows), _TRANSACTION_ROWS):
            self._table.submit_transaction([("upsert", row) for row in rows[start : start + _TRANSACTION_ROWS]])
        entity = {**old, "PartitionKey": PARTITION, "RowKey": run_key(run_id), "RunId": run_id}
        moves = _index_moves(here, _run_from_entity(entity, ""))
        # Copied before the version before wrote to it again: replaced, unless changed here since.
        run_row = ("create", entity) if here is None else ("update", entity, _unchanged_since(here.etag, whole=True))
        try:
            self._table.submit_transaction([run_row, *moves])
        except (TableTransactionError, ResourceExistsError, ResourceModifiedError) as error:
            if not _is_error(error, "EntityAlreadyExists", "UpdateConditionNotSatisfied"):
                raise
            return False  # a concurrent migration (or a handler here) got to it first
        return True

    def _remove(self, run_id: str, old: TableEntity, history: list[TableEntity]) -> bool:
        """Delete a copied run's old rows, its old row first and only if still as read: False
        when it was not (the version before wrote to it since; nothing is deleted then). Rows
        already gone (a concurrent migration) are fine."""
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError
        from azure.data.tables import TableTransactionError

        etag, unchanged = old.metadata["etag"], MatchConditions.IfNotModified
        keys = [_OLD_RUN_ROW, *(row["RowKey"] for row in history)]
        for start in range(0, len(keys), _TRANSACTION_ROWS):
            batch = keys[start : start + _TRANSACTION_ROWS]
            operations: list[tuple[Any, ...]] = [("delete", {"PartitionKey": run_id, "RowKey": key}) for key in batch]
            if start == 0:
                operations[0] = (*operations[0], {"etag": etag, "match_condition": unchanged})
            try:
                self._table.submit_transaction(operations)
            except TableTransactionError as error:
                if start == 0 and _is_error(error, "UpdateConditionNotSatisfied"):
                    return False
                try:  # one by one: a row gone already is no error
                    for key in batch:
                        conditions = {"etag": etag, "match_condition": unchanged} if key == _OLD_RUN_ROW else {}
                        self._table.delete_entity(run_id, key, **conditions)  # type: ignore[arg-type]
                except ResourceModifiedError:
                    return False
        return True


@dataclass(frozen=True)
class Migration:
    copied: int  # runs moved into this layout now
    found: int  # runs an earlier or concurrent migration had moved already
    removed: int  # rows of the old layout deleted
    complete: bool  # False: stopped at its time budget, the table not yet marked


def _runs_table(settings: Settings) -> TableClient:
    from shared.storage import table_service
    from shared.vocabulary import RUNS_TABLE

    return table_service(settings.storage).create_table_if_not_exists(RUNS_TABLE)


@lru_cache(maxsize=4)
def open_ledger(settings: Settings) -> Ledger:
    """The ledger in the app's storage account, its table created and brought into this layout on
    first use."""
    ledger = Ledger(_runs_table(settings))
    ledger.ensure_layout()
    return ledger


def migrate_ledger(settings: Settings) -> Migration:
    """Move the app's ledger into this layout (`python -m shared.cli migrate-ledger`), whether or
    not it is marked as moved already."""
    return Ledger(_runs_table(settings)).migrate()
