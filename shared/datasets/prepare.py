"""Prepare an uploaded chat dataset for fine-tuning: validate every row, drop duplicates, sample,
split deterministically into `train_sft.jsonl` / `test_sft.jsonl`, and write `report.json`.

One streaming pass: memory stays flat whatever the input size (the duplicate check keeps one
small integer per conversation). The same code runs from the blob trigger and the command line.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson

from shared.datasets.formats import MAP_PREFIX, Converter, checked_mapping, mapping_from
from shared.datasets.offload import BlockWriter, Offload
from shared.datasets.references import MAX_REFERENCE_BYTES, is_reference, parse_reference, reference_rows
from shared.datasets.seen import SeenHashes
from shared.datasets.sources import ChunkStream, Row, UnreadableDataset, read_rows
from shared.datasets.validate import ERROR_CATEGORIES, WARNING_CATEGORIES, check_conversation
from shared.settings import DatasetSettings
from shared.training import PARAMETERS, ParameterError, parse_parameter, resolve_parameters
from shared.validation import RESOURCE_NAME, SAMPLE_PERCENT, TEST_PERCENT, USD
from shared.vocabulary import REJECTED_FILE, REPORT_FILE, TEST_FILE, TRAIN_FILE

FIRST_LINES = 20
_BUCKETS = 10_000
_TOKEN_HISTOGRAM_SIZE = 1 << 16
# Per-upload overrides of the dataset settings, from blob metadata (the rest are training parameters).
DATASET_OVERRIDES = {
    "test_pc": ("test_percent", TEST_PERCENT),
    "sample_pc": ("sample_percent", SAMPLE_PERCENT),
    "max_cost_usd": ("max_training_cost_usd", USD),
}


ENDPOINT_METADATA = "endpoint"


@dataclass(frozen=True)
class InputInfo:
    """What the upload is: shown in the report and in every error message."""

    name: str
    size: int | None = None
    etag: str | None = None


@dataclass(frozen=True)
class Preparation:
    accepted: bool
    reason: str  # one line
    report: dict[str, Any]
    out_dir: Path
    first_problems: list[str]  # "file:line: reason", in file order

    @property
    def files(self) -> list[Path]:
        names = (TRAIN_FILE, TEST_FILE, REPORT_FILE, REJECTED_FILE)
        return [self.out_dir / name for name in names if (self.out_dir / name).exists()]


@dataclass
class _Tally:
    count: int = 0
    lines: list[int] = field(default_factory=list)
    first: str = ""

    def add(self, line: int, message: str) -> None:
        self.count += 1
        if len(self.lines) < FIRST_LINES:
            self.lines.append(line)
        if not self.first:
            self.first = message


ESTIMATED_TOKENS = "estimate: characters / 4 + 3 per message"


class Histogram:
    """Exact percentiles of token counts in constant memory (counts above the cap share a bucket)."""

    def __init__(self) -> None:
        self.counts = [0] * _TOKEN_HISTOGRAM_SIZE
        self.total = 0
        self.n = 0
        self.max = 0

    def add(self, value: int) -> None:
        self.counts[min(value, _TOKEN_HISTOGRAM_SIZE - 1)] += 1
        self.total += value
        self.n += 1
        self.max = max(self.max, value)

    def absorb(self, other: Histogram) -> None:
        self.counts = [mine + theirs for mine, theirs in zip(self.counts, other.counts, strict=True)]
        self.total += other.total
        self.n += other.n
        self.max = max(self.max, other.max)

    def percentile(self, p: float) -> int:
        if not self.n:
            return 0
        rank, seen = p / 100 * self.n, 0
        for value, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return min(value, self.max)
        return self.max


def token_statistics(method: str, tokens: Histogram, over_max_seq_length: int) -> dict[str, Any]:
    """Per-conversation token counts: how they were counted, percentiles, total, and how many
    conversations are longer than max_seq_length (training truncates them)."""
    return {
        "method": method,
        "p50": tokens.percentile(50),
        "p95": tokens.percentile(95),
        "max": tokens.max,
        "total": tokens.total,
        "over_max_seq_length": over_max_seq_length,
    }


def training_tokens(per_epoch: int, epochs: float) -> dict[str, Any]:
    return {"per_epoch": per_epoch, "epochs": epochs, "total": round(per_epoch * epochs)}


def bucket(prompt_id: str, salt: bytes) -> int:
    """A stable position 0..9999 for a conversation: the same on every run and machine."""
    digest = hashlib.blake2b(prompt_id.encode(), digest_size=8, salt=salt).digest()
    return int.from_bytes(digest, "big") % _BUCKETS


def read_overrides(
    metadata: Mapping[str, str], settings: DatasetSettings
) -> tuple[DatasetSettings, dict[str, Any], dict[str, str]]:
    """Split blob metadata into dataset-setting and training-parameter overrides and the column
    mapping, checking each (`endpoint`, the endpoint to serve the model at, is checked and left to
    the caller). Raises ParameterError naming the first bad key."""
    dataset_changes: dict[str, Any] = {}
    training: dict[str, Any] = {}
    for key, value in sorted(metadata.items()):
        name = key.lower()
        if name == ENDPOINT_METADATA:
            try:
                RESOURCE_NAME.parse(value)
            except ValueError:
                raise ParameterError(f"{key}={value!r}: an endpoint name is {RESOURCE_NAME.expects}") from None
        elif name in DATASET_OVERRIDES:
            attribute, rule = DATASET_OVERRIDES[name]
            try:
                dataset_changes[attribute] = rule.parse(value)
            except ValueError:
                raise ParameterError(f"{key}={value!r}: expected {rule.expects}") from None
        elif name in PARAMETERS:
            training[name] = parse_parameter(name, value)
        elif name.startswith(MAP_PREFIX):
            continue  # the mapping is checked whole, below
        else:
            known = ", ".join([ENDPOINT_METADATA, *DATASET_OVERRIDES, f"{MAP_PREFIX}<field>", *PARAMETERS])
            raise ParameterError(f"unknown setting {key!r}: known ones are {known}")
    try:
        mapping = mapping_from(metadata)
    except ValueError as error:
        raise ParameterError(str(error)) from None
    return replace(settings, **dataset_changes), training, mapping


class Preparer:
    def __init__(self, out_dir: Path, info: InputInfo, settings: DatasetSettings, training: dict[str, Any]) -> None:
        self.out_dir, self.info, self.settings = out_dir, info, settings
        self.parameters = resolve_parameters(training)
        self.training_overrides = training
        requested_length = self.parameters["max_seq_length"]
        self.max_seq_length = requested_length if requested_length > 0 else settings.max_seq_length
        self.errors: dict[str, _Tally] = {}
        self.warnings: dict[str, _Tally] = {}
        self.first_problems: list[str] = []
        self.rows = self.invalid = self.duplicates = self.sampled_out = 0
        self.split = {"train": 0, "test": 0}
        self.train_tokens = 0
        self.turns = self.characters = self.max_turns = self.max_characters = 0
        self.tokens = Histogram()
        self.seen_ids, self.seen_conversations = SeenHashes(), SeenHashes()
        self.smallest_train: tuple[int, bytes, int] | None = None  # (bucket, line, tokens)

    def _error(self, row: Row, problems: list[tuple[str, str]], rejected: BlockWriter) -> None:
        self.invalid += 1
        for category, message in problems:
            self.errors.setdefault(category, _Tally()).add(row.line, message)
            if len(self.first_problems) < FIRST_LINES:
                self.first_problems.append(f"{self.info.name}:{row.line}: {message}")
        record = {
            "line": row.line,
            "reasons": [message for _, message in problems],
            "categories": sorted({category for category, _ in problems}),
            "text": row.raw[:-1].decode("utf-8", "replace") if row.raw is not None else row.value,
        }
        rejected.write(orjson.dumps(record, default=str) + b"\n")

    def _warn(self, line: int, category: str, message: str) -> None:
        self.warnings.setdefault(category, _Tally()).add(line, message)

    def run(self, rows: Iterable[Row], train: BlockWriter, test: BlockWriter, rejected: BlockWriter) -> None:
        # The hot loop: counters live in locals and are stored once at the end.
        test_cut = round(self.settings.test_percent * _BUCKETS / 100)
        sample_cut = round(self.settings.sample_percent * _BUCKETS / 100)
        seen_ids, seen_conversations = self.seen_ids, self.seen_conversations
        max_seq_length, add_tokens, warn = self.max_seq_length, self.tokens.add, self._warn
        total = duplicates = sampled_out = turns = characters = max_turns = max_characters = 0
        train_rows = test_rows = train_tokens = 0
        smallest_train = self.smallest_train
        for row in rows:
            total += 1
            if row.error:
                self._error(row, [row.error], rejected)
                continue
            checked = check_conversation(row.value)
            if checked.errors:
                self._error(row, checked.errors, rejected)
                continue
            for category, message in checked.warnings:
                warn(row.line, category, message)
            prompt_id = checked.prompt_id
            if not seen_ids.add(hash(prompt_id)):
                duplicates += 1
                warn(row.line, "duplicate_prompt_id", f"prompt_id {prompt_id} appeared earlier")
                continue
            if not seen_conversations.add(checked.content_key):
                duplicates += 1
                warn(row.line, "duplicate_conversation", "the same messages appeared earlier")
                continue
            if sample_cut < _BUCKETS and bucket(prompt_id, b"sample") >= sample_cut:
                sampled_out += 1
                continue

            tokens = checked.estimated_tokens
            if tokens > max_seq_length:
                warn(row.line, "over_max_seq_length", f"about {tokens} tokens, over {max_seq_length}")
            add_tokens(tokens)
            turns += checked.turns
            characters += checked.characters
            max_turns = max(max_turns, checked.turns)
            max_characters = max(max_characters, checked.characters)
            raw = row.raw
            line = orjson.dumps(checked.row, default=str) + b"\n" if checked.changed or raw is None else raw
            position = bucket(prompt_id, b"split")
            if position < test_cut:
                test_rows += 1
                test.write(line)
            else:
                train_rows += 1
                train_tokens += tokens
                train.write(line)
                if smallest_train is None or position < smallest_train[0]:
                    smallest_train = (position, line, tokens)
        self.rows, self.duplicates, self.sampled_out = total, duplicates, sampled_out
        self.turns, self.characters, self.max_turns, self.max_characters = turns, characters, max_turns, max_characters
        self.split, self.train_tokens, self.smallest_train = (
            {"train": train_rows, "test": test_rows},
            train_tokens,
            smallest_train,
        )

    def absorb(self, later: Preparer, lines_before: int) -> None:
        """Add what `later` found in the part of the file after this one's, whose first line was
        line `lines_before` + 1, as if one preparer had read both parts in order. `later` must
        have found no invalid row (its rejected rows would carry lines counted from its part)."""
        assert not later.invalid, "a part with invalid rows is prepared again in one piece"
        for category, tally in later.warnings.items():
            mine = self.warnings.setdefault(category, _Tally())
            mine.count += tally.count
            mine.lines = (mine.lines + [lines_before + line for line in tally.lines])[:FIRST_LINES]
            mine.first = mine.first or tally.first
        self.rows += later.rows
        self.duplicates += later.duplicates
        self.sampled_out += later.sampled_out
        self.split = {name: count + later.split[name] for name, count in self.split.items()}
        self.train_tokens += later.train_tokens
        self.turns += later.turns
        self.characters += later.characters
        self.max_turns = max(self.max_turns, later.max_turns)
        self.max_characters = max(self.max_characters, later.max_characters)
        self.tokens.absorb(later.tokens)
        if later.smallest_train and (not self.smallest_train or later.smallest_train[0] < self.smallest_train[0]):
            self.smallest_train = later.smallest_train

    def ensure_test_row(self) -> None:
        """A tiny upload can hash no row into test: move the train row nearest the cut there, so
        evaluation always has data (still deterministic)."""
        if self.split["test"] or self.split["train"] < 2 or self.smallest_train is None:
            return
        moved = self.smallest_train[1]
        train_path, test_path = self.out_dir / TRAIN_FILE, self.out_dir / TEST_FILE
        kept = train_path.with_suffix(".tmp")
        with train_path.open("rb") as source, kept.open("wb") as target:
            skipped = False
            for line in source:
                if not skipped and line == moved:
                    skipped = True
                    continue
                target.write(line)
        os.replace(kept, train_path)
        test_path.write_bytes(moved)
        self.split = {"train": self.split["train"] - 1, "test": 1}
        self.train_tokens -= self.smallest_train[2]


def _tallies(tallies: dict[str, _Tally], descriptions: Mapping[str, str]) -> dict[str, Any]:
    return {
        category: {"description": descriptions[category], "count": t.count, "first_lines": t.lines, "example": t.first}
        for category, t in sorted(tallies.items(), key=lambda item: -item[1].count)
    }


def _decide(p: Preparer, fatal: str | None, usable: int) -> tuple[bool, str]:
    if fatal:
        return False, fatal
    if p.invalid:
        fraction = p.invalid / p.rows
        first = p.first_problems[0].split(":", 1)[1] if p.first_problems else ""
        if p.settings.max_invalid_fraction == 0:
            return False, (
                f"{p.invalid} of {p.rows} rows have errors (first at line {first}); fix them, or set "
                "DATASET_MAX_INVALID_FRACTION to drop up to that fraction of invalid rows"
            )
        if fraction > p.settings.max_invalid_fraction:
            return False, (
                f"{p.invalid} of {p.rows} rows ({fraction:.1%}) have errors, more than the allowed "
                f"{p.settings.max_invalid_fraction:.1%} (first at line {first})"
            )
    if usable < p.settings.min_conversations:
        return False, (
            f"only {usable} usable conversation(s) of {p.rows} rows; at least {p.settings.min_conversations} are needed"
        )
    dropped = f"; dropped {p.invalid} invalid rows (see {REJECTED_FILE})" if p.invalid else ""
    return True, f"prepared {usable} conversations: {p.split['train']} train, {p.split['test']} test{dropped}"


def prepare_dataset(
    chunks: Iterable[bytes],
    out_dir: Path,
    info: InputInfo,
    settings: DatasetSettings,
    metadata: Mapping[str, str] | None = None,
    on_progress: Callable[[int], None] | None = None,
    refusal: str | None = None,
    local_folders: bool = True,
) -> Preparation:
    """Validate, split and report on one upload, writing the outputs into `out_dir`.

    Never raises for anything in the data: every problem ends in a rejected Preparation with a
    report. `chunks` is the upload's bytes in pieces (a blob download or a file read);
    `refusal` rejects the upload for a reason found before reading it; `local_folders` lets a
    dataset reference name a folder on this machine."""
    settings, training, mapping, refused = start(out_dir, metadata, settings)
    fatal = refusal or refused
    preparer = Preparer(out_dir, info, settings, training)
    offload = Offload()
    stream = ChunkStream(chunks, on_progress, hash_with=offload.submit)
    input_format, converter, source = "unknown", Converter(), None
    if fatal is None:
        outputs = [BlockWriter(out_dir / name, offload) for name in (TRAIN_FILE, TEST_FILE, REJECTED_FILE)]
        try:
            converter = Converter(mapping)
            if is_reference(info.name):
                reference = parse_reference(io.BufferedReader(stream).read(MAX_REFERENCE_BYTES + 1))
                source, rows = reference_rows(reference, local_folders)
                input_format, converter = "hfdataset", Converter(_merged(converter.mapping, reference.map))
                if reference.sample_percent is not None:
                    preparer.settings = replace(preparer.settings, sample_percent=reference.sample_percent)
            else:
                input_format, rows = read_rows(stream, info.name)
            preparer.run(map(converter.convert, rows), *outputs)
        except UnreadableDataset as error:
            preparer.errors.setdefault(error.category, _Tally()).add(0, str(error))
            preparer.first_problems.insert(0, f"{info.name}: {error}")
            fatal = str(error)
        finally:
            for output in outputs:
                output.close()
        stream.drain()  # what the parser did not need still counts in the sha256
    offload.close()
    read = ReadInput(input_format, converter.format_name, converter.mapping, source, stream.bytes_read,
                     stream.sha256.hexdigest())  # fmt: skip
    return conclude(preparer, read, fatal, metadata)


@dataclass(frozen=True)
class ReadInput:
    """What reading the upload found about it, for the report."""

    format: str  # jsonl, jsonl.gz, parquet, csv, tsv, hfdataset, or unknown
    chat_format: str
    mapping: Mapping[str, str]
    source: dict[str, Any] | None  # what a dataset reference resolved to
    size: int
    sha256: str


Overrides = tuple[DatasetSettings, dict[str, Any], dict[str, str], str | None]


def start(out_dir: Path, metadata: Mapping[str, str] | None, settings: DatasetSettings) -> Overrides:
    """Clear `out_dir` of an earlier preparation's outputs and read the upload's overrides:
    (settings, training overrides, column mapping, the reason to refuse it, if any)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (TRAIN_FILE, TEST_FILE, REJECTED_FILE):
        (out_dir / name).unlink(missing_ok=True)
    try:
        return (*read_overrides(metadata or {}, settings), None)
    except ParameterError as error:
        return settings, {}, {}, str(error)


def conclude(preparer: Preparer, read: ReadInput, fatal: str | None, metadata: Mapping[str, str] | None) -> Preparation:
    """Decide on a read upload, drop the outputs a rejected one must not leave, write its report."""
    if fatal is None:
        preparer.ensure_test_row()
    out_dir = preparer.out_dir
    usable = preparer.split["train"] + preparer.split["test"]
    accepted, reason = _decide(preparer, fatal, usable)
    if not accepted:
        for name in (TRAIN_FILE, TEST_FILE):
            (out_dir / name).unlink(missing_ok=True)
    if not preparer.invalid:
        (out_dir / REJECTED_FILE).unlink(missing_ok=True)
    report = _report(preparer, read, accepted, reason, usable)
    # Where the model is to be served, if the upload says (else one endpoint per dataset name).
    report["endpoint"] = next((v for k, v in (metadata or {}).items() if k.lower() == ENDPOINT_METADATA), None)
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return Preparation(accepted, reason, report, out_dir, preparer.first_problems)


def _merged(metadata: Mapping[str, str], reference: Mapping[str, str]) -> dict[str, str]:
    """The upload's metadata mapping, then the reference's own over it, checked as one."""
    try:
        return checked_mapping({**metadata, **reference}, lambda ours, theirs: f"map {ours!r}: {theirs!r}")
    except ValueError as error:
        raise UnreadableDataset("reference_invalid", f"dataset reference: {error}") from None


def _report(p: Preparer, read: ReadInput, accepted: bool, reason: str, usable: int) -> dict[str, Any]:
    valid = p.rows - p.invalid
    epochs = p.parameters["num_train_epochs"]
    over_length = p.warnings["over_max_seq_length"].count if "over_max_seq_length" in p.warnings else 0
    return {
        "status": "accepted" if accepted else "rejected",
        "reason": reason,
        "input": {
            "name": p.info.name,
            "format": read.format,
            "size": p.info.size if p.info.size is not None else read.size,
            "etag": p.info.etag,
            "sha256": read.sha256,
            "chat_format": read.chat_format,
            "mapping": dict(read.mapping),
            "source": read.source,
        },
        "settings": {**asdict(p.settings), "effective_max_seq_length": p.max_seq_length},
        "training_overrides": p.training_overrides,
        "rows": {
            "total": p.rows,
            "valid": valid,
            "invalid": p.invalid,
            "duplicates": p.duplicates,
            "sampled_out": p.sampled_out,
            "usable": usable,
        },
        "errors": _tallies(p.errors, ERROR_CATEGORIES),
        "warnings": _tallies(p.warnings, WARNING_CATEGORIES),
        "split": {**p.split, "test_percent": p.settings.test_percent, "sample_percent": p.settings.sample_percent},
        "statistics": {
            "turns": {"total": p.turns, "mean": round(p.turns / usable, 2) if usable else 0, "max": p.max_turns},
            "characters": {
                "total": p.characters,
                "mean": round(p.characters / usable, 1) if usable else 0,
                "max": p.max_characters,
            },
            "tokens": token_statistics(ESTIMATED_TOKENS, p.tokens, over_length),
            "training_tokens": training_tokens(p.train_tokens, epochs),
        },
        "outputs": {
            "train": TRAIN_FILE if accepted else None,
            "test": TEST_FILE if accepted else None,
            "rejected_rows": REJECTED_FILE if p.invalid else None,
        },
    }


def rewrite_report(preparation: Preparation) -> Preparation:
    """Write the report again after later steps added to it."""
    (preparation.out_dir / REPORT_FILE).write_text(json.dumps(preparation.report, indent=2) + "\n")
    return preparation


def refuse(preparation: Preparation, reason: str) -> Preparation:
    """Reject a prepared upload for a reason found after its data passed (the budget): no
    training files, the report saying why."""
    for name in (TRAIN_FILE, TEST_FILE):
        (preparation.out_dir / name).unlink(missing_ok=True)
    report = {**preparation.report, "status": "rejected", "reason": reason,
              "outputs": {**preparation.report["outputs"], "train": None, "test": None}}  # fmt: skip
    return rewrite_report(replace(preparation, accepted=False, reason=reason, report=report))


def report_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a report worth keeping in the ledger: small, and enough to answer "why"."""
    return {
        "status": report["status"],
        "rows": report["rows"],
        "split": {key: report["split"][key] for key in ("train", "test")},
        "errors": {category: tally["count"] for category, tally in report["errors"].items()},
        "warnings": {category: tally["count"] for category, tally in report["warnings"].items()},
        "training_tokens": report["statistics"]["training_tokens"]["total"],
        "tokens_counted": report["statistics"]["tokens"]["method"],
        **({"estimate": report["estimate"]} if "estimate" in report else {}),
        "sha256": report["input"]["sha256"],
        "training_overrides": report["training_overrides"],
        "endpoint": report.get("endpoint"),
    }
