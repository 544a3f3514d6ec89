"""Dataset preparation: every rule with its line number, every accepted form, determinism,
and a property test that nothing crashes the validator."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.datasets.prepare import InputInfo, Preparation, prepare_dataset
from shared.datasets.sample import conversations, write_sample
from shared.datasets.validate import ERROR_CATEGORIES, WARNING_CATEGORIES
from shared.settings import DatasetSettings
from shared.vocabulary import REJECTED_FILE, REPORT_FILE, TEST_FILE, TRAIN_FILE

REPO = Path(__file__).resolve().parent.parent
GOOD = [orjson.dumps(row) for row in conversations(20, seed=3)]


def _prepare(tmp_path: Path, data: bytes, name: str = "upload.jsonl", **kwargs: Any) -> Preparation:
    metadata = kwargs.pop("metadata", None)
    settings = DatasetSettings(**kwargs)
    chunks = [data[i : i + 7] for i in range(0, len(data), 7)] or [b""]  # lines cross chunk borders
    return prepare_dataset(chunks, tmp_path / "out", InputInfo(name, len(data)), settings, metadata)


def _lines(*rows: bytes) -> bytes:
    return b"\n".join(rows) + b"\n"


def _chat(*turns: tuple[Any, Any], **extra: Any) -> bytes:
    return orjson.dumps({"messages": [{"role": r, "content": c} for r, c in turns], **extra})


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


ERROR_CASES = [
    (b'{"messages": [', "invalid_json", "invalid JSON at column"),
    (b'{"messages": "\xff\xfe"}', "invalid_utf8", "invalid UTF-8 at byte offset 14"),
    (b'"just a string"', "not_an_object", "the line is a string, not a JSON object"),
    (b'{"prompt": "hi"}', "messages_missing", "'messages' is missing"),
    (b'{"messages": []}', "messages_not_a_list", "'messages' is an array; expected a non-empty list"),
    (b'{"messages": {"role": "user"}}', "messages_not_a_list", "'messages' is an object"),
    (b'{"messages": ["hello", {"role": "assistant", "content": "x"}]}', "message_not_an_object", "messages[0]"),
    (b'{"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]}', "message_missing_field", "no 'role'"),
    (_chat(("user", "x"), ("assistant", None)), "message_missing_field", "messages[1] has no 'content'"),
    (_chat(("bot", "x"), ("assistant", "y")), "unknown_role", "messages[0].role is 'bot'"),
    (_chat(("user", ["x"]), ("assistant", "y")), "content_not_a_string", "messages[0].content is an array"),
    (_chat(("user", " \t\n"), ("assistant", "y")), "empty_content", "messages[0].content is empty"),
    (_chat(("user", "x"), ("system", "be nice"), ("assistant", "y")), "system_not_first", "messages[1] is a system"),
    (_chat(("system", "s"), ("user", "x")), "no_assistant_message", "no message has role 'assistant'"),
    (_chat(("user", "x"), ("assistant", "y"), prompt_id=7), "prompt_id_invalid", "'prompt_id' is a number"),
    (_chat(("user", "x"), ("assistant", "y"), prompt=["x"]), "prompt_invalid", "'prompt' is an array"),
]


@pytest.mark.parametrize(("line", "category", "message"), ERROR_CASES, ids=[c[1] for c in ERROR_CASES])
def test_every_error_is_reported_with_its_line_and_reason(
    tmp_path: Path, line: bytes, category: str, message: str
) -> None:
    result = _prepare(tmp_path, _lines(*GOOD[:12], b"", line, *GOOD[12:]))
    assert not result.accepted
    errors = result.report["errors"]
    assert list(errors) == [category]
    assert errors[category]["first_lines"] == [14]  # blank line 13 is skipped but counted
    assert message in errors[category]["example"]
    assert errors[category]["description"] == ERROR_CATEGORIES[category]
    assert result.first_problems[0].startswith("upload.jsonl:14: ")
    assert message in result.first_problems[0]
    assert "DATASET_MAX_INVALID_FRACTION" in result.reason
    assert not (tmp_path / "out" / TRAIN_FILE).exists()
    (rejected,) = _jsonl(tmp_path / "out" / REJECTED_FILE)
    assert rejected["line"] == 14 and rejected["categories"] == [category]


def test_every_category_has_a_test() -> None:
    from tests.test_formats import FILE_CASES, ROW_CASES

    tested = {case[1] for case in ERROR_CASES} | {"json_array", "unreadable_gzip", "unreadable_parquet"}
    tested |= {case[2] for case in ROW_CASES} | {case[2] for case in FILE_CASES} | {"csv_field_count"}
    assert tested | {"line_too_long"} == set(ERROR_CATEGORIES)


def test_all_problems_of_a_row_are_reported(tmp_path: Path) -> None:
    line = _chat(("bot", ""), ("system", 5))
    result = _prepare(tmp_path, _lines(line, *GOOD))
    assert set(result.report["errors"]) == {
        "unknown_role",
        "empty_content",
        "system_not_first",
        "content_not_a_string",
        "no_assistant_message",
    }


def test_first_twenty_line_numbers_per_category(tmp_path: Path) -> None:
    result = _prepare(tmp_path, _lines(*GOOD, *[b"{oops"] * 30))
    tally = result.report["errors"]["invalid_json"]
    assert tally["count"] == 30
    assert tally["first_lines"] == list(range(21, 41))


def test_warnings_are_counted_and_do_not_reject(tmp_path: Path) -> None:
    long_text = "word " * 800
    rows = [
        _chat(("user", "a"), ("user", "b"), ("assistant", "c"), prompt_id="p-consecutive"),
        _chat(("user", "q"), ("assistant", "a"), ("user", "dangling"), prompt_id="p-ends-user"),
        _chat(("user", "long"), ("assistant", long_text), prompt_id="p-long"),
        GOOD[0],  # duplicate prompt_id of line 4 + 8 ... see below
    ]
    duplicate_content = orjson.loads(GOOD[1])
    duplicate_content["prompt_id"] = "another-id"
    result = _prepare(tmp_path, _lines(*rows, *GOOD, orjson.dumps(duplicate_content)), max_seq_length=400)
    assert result.accepted, result.reason
    warnings = result.report["warnings"]
    assert set(warnings) == set(WARNING_CATEGORIES)
    assert warnings["consecutive_same_role"]["first_lines"] == [1]
    assert warnings["ends_with_user_turn"]["first_lines"] == [2]
    assert warnings["over_max_seq_length"]["first_lines"] == [3]
    assert warnings["duplicate_prompt_id"]["first_lines"] == [5]
    assert warnings["duplicate_conversation"]["first_lines"] == [25]
    assert result.report["rows"]["duplicates"] == 2
    assert result.report["rows"]["usable"] == 23
    written = _jsonl(tmp_path / "out" / TRAIN_FILE) + _jsonl(tmp_path / "out" / TEST_FILE)
    ends_user = next(row for row in written if row["prompt_id"] == "p-ends-user")
    assert [m["role"] for m in ends_user["messages"]] == ["user", "assistant"]


def test_too_few_usable_conversations_is_rejected(tmp_path: Path) -> None:
    result = _prepare(tmp_path, _lines(*GOOD[:9]))
    assert not result.accepted
    assert result.reason == "only 9 usable conversation(s) of 9 rows; at least 10 are needed"
    assert _prepare(tmp_path, _lines(*GOOD[:9]), min_conversations=5).accepted


def test_a_json_array_file_is_rejected_with_that_explanation(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in GOOD]
    for data in (json.dumps(rows).encode(), json.dumps(rows, indent=2).encode()):
        result = _prepare(tmp_path, data, name="data.json")
        assert not result.accepted
        assert result.reason.startswith("the file is a single JSON array, not JSON Lines")
        assert "jq -c '.[]'" in result.reason
        assert list(result.report["errors"]) == ["json_array"]


def test_invalid_rows_can_be_dropped_up_to_a_fraction(tmp_path: Path) -> None:
    data = _lines(*GOOD[:10], b"{broken", *GOOD[10:])
    kept = _prepare(tmp_path, data, max_invalid_fraction=0.1)
    assert kept.accepted, kept.reason
    assert "dropped 1 invalid rows" in kept.reason
    assert _jsonl(tmp_path / "out" / REJECTED_FILE) == [
        {"line": 11, "reasons": [kept.report["errors"]["invalid_json"]["example"]],
         "categories": ["invalid_json"], "text": "{broken"}
    ]  # fmt: skip
    assert kept.report["rows"]["usable"] == 20
    too_many = _prepare(tmp_path, data, max_invalid_fraction=0.01)
    assert not too_many.accepted
    assert "more than the allowed 1.0%" in too_many.reason


def test_accepted_forms_give_identical_output(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    plain = _lines(*GOOD)
    bom_crlf = b"\xef\xbb\xbf" + b"\r\n".join(GOOD) + b"\r\n\r\n  \r\n"
    table = pa.Table.from_pylist([json.loads(line) for line in GOOD])
    parquet_path = tmp_path / "data.parquet"
    pq.write_table(table, parquet_path)
    forms = {
        "jsonl": plain,
        "bom_crlf": bom_crlf,
        "jsonl.gz": gzip.compress(plain),
        "parquet": parquet_path.read_bytes(),
    }
    outputs = {}
    for form, data in forms.items():
        result = _prepare(tmp_path / form, data, name=f"data.{form}")
        assert result.accepted, (form, result.reason)
        assert result.report["errors"] == {} and result.report["warnings"] == {}
        outputs[form] = [_jsonl(tmp_path / form / "out" / name) for name in (TRAIN_FILE, TEST_FILE)]
    assert outputs["jsonl"] == outputs["bom_crlf"] == outputs["jsonl.gz"] == outputs["parquet"]
    assert _prepare(tmp_path / "gz", forms["jsonl.gz"]).report["input"]["format"] == "jsonl.gz"


def test_plain_messages_shape_gets_prompt_and_prompt_id(tmp_path: Path) -> None:
    rows = [
        _chat(("system", "be brief"), ("user", f"question {i}"), ("assistant", "answer"), source="forum")
        for i in range(12)
    ]
    result = _prepare(tmp_path, _lines(*rows))
    assert result.accepted
    written = _jsonl(tmp_path / "out" / TRAIN_FILE) + _jsonl(tmp_path / "out" / TEST_FILE)
    first = next(row for row in written if row["prompt"] == "question 0")
    assert list(first) == ["prompt", "prompt_id", "messages", "source"]
    assert len(first["prompt_id"]) == 64 and first["source"] == "forum"


def test_split_and_sample_are_deterministic_hash_based_and_not_first_n(tmp_path: Path) -> None:
    rows = [orjson.dumps(row) for row in conversations(400, seed=9)]
    first = _prepare(tmp_path / "a", _lines(*rows), test_percent=10, sample_percent=50)
    second = _prepare(tmp_path / "b", _lines(*reversed(rows)), test_percent=10, sample_percent=50)
    ids = {}
    for name, result in (("a", first), ("b", second)):
        assert result.accepted, result.reason
        out = tmp_path / name / "out"
        ids[name] = [{row["prompt_id"] for row in _jsonl(out / f)} for f in (TRAIN_FILE, TEST_FILE)]
        assert (out / TRAIN_FILE).read_bytes()  # written
    assert ids["a"] == ids["b"]  # the split depends on the conversation, not on its position
    kept = ids["a"][0] | ids["a"][1]
    assert 150 < len(kept) < 250  # about half
    first_half = {json.loads(line)["prompt_id"] for line in rows[:200]}
    assert kept != first_half
    assert 10 < len(ids["a"][1]) < 40  # about 10% of what was kept
    assert first.report["rows"]["sampled_out"] == 400 - len(kept)


def test_a_tiny_upload_still_gets_a_test_row(tmp_path: Path) -> None:
    result = _prepare(tmp_path, _lines(*GOOD[:10]), test_percent=1)
    assert result.accepted
    assert result.report["split"]["train"] == 9 and result.report["split"]["test"] == 1
    assert len(_jsonl(tmp_path / "out" / TEST_FILE)) == 1


def test_report_contents(tmp_path: Path) -> None:
    import hashlib

    data = _lines(*GOOD)
    result = _prepare(tmp_path, data, metadata={"num_train_epochs": "2", "test_pc": "10"})
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert report == result.report
    assert report["input"] == {
        "name": "upload.jsonl",
        "format": "jsonl",
        "size": len(data),
        "etag": None,
        "sha256": hashlib.sha256(data).hexdigest(),
        "chat_format": "messages",
        "mapping": {},
        "source": None,
    }
    assert report["settings"]["test_percent"] == 10
    assert report["training_overrides"] == {"num_train_epochs": 2}
    tokens = report["statistics"]["tokens"]
    assert 0 < tokens["p50"] <= tokens["p95"] <= tokens["max"] < tokens["total"]
    assert tokens["method"].startswith("estimate:") and tokens["over_max_seq_length"] == 0
    training = report["statistics"]["training_tokens"]
    assert training["epochs"] == 2 and training["total"] == 2 * training["per_epoch"]
    assert report["statistics"]["turns"]["total"] == sum(len(json.loads(g)["messages"]) for g in GOOD)


@pytest.mark.parametrize(
    ("metadata", "says"),
    [
        ({"colour": "blue"}, "unknown setting 'colour'"),
        ({"test_pc": "0"}, "test_pc='0': expected a percentage above 0 and below 100"),
        ({"learning_rate": "fast"}, "training parameter learning_rate='fast': expected a number above 0"),
        ({"apply_lora": "yes"}, "training parameter apply_lora='yes': expected true or false"),
        ({"endpoint": "support\nbot"}, "endpoint='support\\nbot': an endpoint name is 3-32 characters"),
        ({"Endpoint": "../etc"}, "Endpoint='../etc': an endpoint name is 3-32 characters"),
    ],
)
def test_bad_per_upload_overrides_reject_naming_the_key(tmp_path: Path, metadata: dict[str, str], says: str) -> None:
    result = _prepare(tmp_path, _lines(*GOOD), metadata=metadata)
    assert not result.accepted
    assert says in result.reason
    assert (tmp_path / "out" / REPORT_FILE).exists()


def test_the_endpoint_an_upload_names_is_in_its_report(tmp_path: Path) -> None:
    result = _prepare(tmp_path, _lines(*GOOD), metadata={"endpoint": "support-bot"})
    assert result.accepted and result.report["endpoint"] == "support-bot"
    assert _prepare(tmp_path, _lines(*GOOD)).report["endpoint"] is None


def test_damaged_gzip_and_parquet_are_rejected(tmp_path: Path) -> None:
    damaged = gzip.compress(_lines(*GOOD))[:-40]
    result = _prepare(tmp_path, damaged)
    assert not result.accepted and result.reason.startswith("the gzip stream is damaged")
    result = _prepare(tmp_path, b"PAR1" + b"\0" * 100)
    assert not result.accepted and result.reason.startswith("the Parquet file cannot be read")


def test_parquet_whose_columns_fit_no_chat_format(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "t.parquet")
    result = _prepare(tmp_path, (tmp_path / "t.parquet").read_bytes())
    assert result.first_problems[0].startswith("upload.jsonl:1: no chat format has the row's fields (text): expected")
    assert "2 of 2 rows have errors" in result.reason


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400))
def test_random_bytes_never_crash_and_always_report(tmp_path: Path, data: bytes) -> None:
    result = _prepare(tmp_path, data)
    assert result.report["status"] in ("accepted", "rejected")
    assert (tmp_path / "out" / REPORT_FILE).exists()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["role", "content", "messages", "prompt", "prompt_id", "x"]), inner, max_size=4
        )
    ),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(json_values, max_size=12))
def test_random_json_never_crashes_and_always_reports(tmp_path: Path, rows: list[Any]) -> None:
    result = _prepare(tmp_path, _lines(*[json.dumps(row).encode() for row in rows]) if rows else b"")
    if rows and isinstance(rows[0], list):
        assert list(result.report["errors"]) == ["json_array"]
        return
    assert result.report["rows"]["total"] == len(rows)
    assert result.report["rows"]["valid"] + result.report["rows"]["invalid"] == len(rows)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )


def test_cli_sample_writes_a_dataset_that_prepare_accepts(tmp_path: Path) -> None:
    written = _cli("sample", str(tmp_path / "chats.jsonl"), "--rows", "25")
    assert written.returncode == 0, written.stderr
    assert json.loads(written.stdout.splitlines()[-1]) == {"out": str(tmp_path / "chats.jsonl"), "rows": 25}
    assert len((tmp_path / "chats.jsonl").read_bytes().splitlines()) == 25
    prepared = _cli("prepare", str(tmp_path / "chats.jsonl"), "--out", str(tmp_path / "prepared"))
    assert prepared.returncode == 0 and json.loads(prepared.stdout.splitlines()[-1])["status"] == "accepted"
    refused = _cli("sample", str(tmp_path / "none.jsonl"), "--rows", "0")
    assert refused.returncode == 1 and refused.stderr.strip() == "error: --rows 0: expected at least 1"


def test_cli_prepare_exit_codes_and_messages(tmp_path: Path) -> None:
    good = write_sample(tmp_path / "good.jsonl", 30)
    accepted = _cli("prepare", str(good), "--out", str(tmp_path / "ok"), "--test-pc", "10")
    assert accepted.returncode == 0, accepted.stderr
    assert json.loads(accepted.stdout.splitlines()[-1])["status"] == "accepted"
    assert {p.name for p in (tmp_path / "ok").iterdir()} == {TRAIN_FILE, TEST_FILE, REPORT_FILE}

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(good.read_bytes() + b"{nope\n")
    rejected = _cli("prepare", str(bad), "--out", str(tmp_path / "no"))
    assert rejected.returncode == 2
    assert f"{bad}:31: invalid JSON at column 2" in rejected.stderr
    assert (tmp_path / "no" / REPORT_FILE).exists()
    assert "Traceback" not in rejected.stderr

    for args in (
        ("prepare", str(tmp_path / "missing.jsonl"), "--out", "x"),
        ("prepare", str(good), "--out", str(tmp_path / "x"), "--test-pc", "abc"),
        ("prepare",),
    ):
        failed = _cli(*args)
        assert failed.returncode == 1, args
        assert "Traceback" not in failed.stderr and "error:" in failed.stderr
