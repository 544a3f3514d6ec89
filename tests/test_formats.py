"""The chat formats and dataset references: each format converts to the same `messages` rows for
the same conversation, CSV and TSV through a column mapping, a local `datasets` folder referenced
by a `*.hfdataset.json` upload prepares like the same rows uploaded as JSON Lines, and every way a
file or a reference can be wrong is one line naming the line or the dataset."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from shared.datasets.prepare import InputInfo, Preparation, prepare_dataset
from shared.datasets.sample import conversations
from shared.settings import DatasetSettings
from shared.vocabulary import REPORT_FILE, TEST_FILE, TRAIN_FILE

REPO = Path(__file__).resolve().parent.parent
SYSTEM = "Answer in one sentence."
# Twelve single exchanges (the formats that hold one) with a system prompt; the user's text has
# two lines, as an Alpaca instruction and its input make.
EXCHANGES = [(f"Question {i}: what is {i} squared?", f"with {i}", f"It is {i * i}.") for i in range(12)]


def _messages(question: str, extra: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{question}\n{extra}"},
            {"role": "assistant", "content": answer}]  # fmt: skip


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(row) + b"\n" for row in rows)


def _delimited(rows: list[dict[str, str]], delimiter: str) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), delimiter=delimiter)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def _parquet(rows: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


# (upload name, its bytes, its metadata): the same twelve conversations in every format.
UPLOADS: dict[str, tuple[str, bytes, dict[str, str]]] = {
    "messages": ("chats.jsonl", _jsonl([{"messages": _messages(*e)} for e in EXCHANGES]), {}),
    "sharegpt": ("chats.jsonl", _jsonl([{"conversations": [{"from": "system", "value": SYSTEM},
                                                            {"from": "human", "value": f"{q}\n{x}"},
                                                            {"from": "gpt", "value": a}]} for q, x, a in EXCHANGES]),
                 {}),
    "alpaca": ("chats.jsonl", _jsonl([{"instruction": q, "input": x, "output": a, "system": SYSTEM}
                                      for q, x, a in EXCHANGES]), {}),
    "prompt_completion": ("chats.jsonl", _jsonl([{"prompt": f"{q}\n{x}", "completion": a, "system": SYSTEM}
                                                 for q, x, a in EXCHANGES]), {}),
    "prompt_completion_conversational": ("chats.jsonl", _jsonl([{"prompt": _messages(*e)[:2],
                                                                  "completion": _messages(*e)[2:]} for e in EXCHANGES]),
                                         {}),
    "csv_mapped": ("pairs.csv", _delimited([{"question": f"{q}\n{x}", "answer": a, "persona": SYSTEM}
                                            for q, x, a in EXCHANGES], ","),
                   {"map_user": "question", "map_assistant": "answer", "map_system": "persona"}),
    "tsv_columns": ("pairs.tsv", _delimited([{"system": SYSTEM, "user": f"{q}\n{x}", "assistant": a}
                                             for q, x, a in EXCHANGES], "\t"), {}),
    "parquet_sharegpt": ("chats.parquet", _parquet([{"conversations": [{"from": "system", "value": SYSTEM},
                                                                       {"from": "human", "value": f"{q}\n{x}"},
                                                                       {"from": "gpt", "value": a}]}
                                                    for q, x, a in EXCHANGES]), {}),
    "jsonl_mapped": ("chats.jsonl", _jsonl([{"dialog": _messages(*e)} for e in EXCHANGES]), {"map_messages": "dialog"}),
}  # fmt: skip
CHAT_FORMATS = {"messages": "messages", "sharegpt": "sharegpt", "alpaca": "alpaca",
                "prompt_completion": "prompt_completion", "prompt_completion_conversational": "prompt_completion",
                "csv_mapped": "turns", "tsv_columns": "turns", "parquet_sharegpt": "sharegpt",
                "jsonl_mapped": "messages"}  # fmt: skip


def _prepare(tmp_path: Path, name: str, data: bytes, metadata: dict[str, str] | None = None) -> Preparation:
    chunks = [data[i : i + 4096] for i in range(0, len(data), 4096)] or [b""]
    return prepare_dataset(chunks, tmp_path / "out", InputInfo(name, len(data)), DatasetSettings(), metadata)


def _rows(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for name in (TRAIN_FILE, TEST_FILE) for line in (folder / name).read_text().splitlines()]


@pytest.mark.parametrize("upload", list(UPLOADS))
def test_each_format_converts_to_the_same_messages_rows_and_says_which_it_was(tmp_path: Path, upload: str) -> None:
    assert _prepare(tmp_path / "expected", *UPLOADS["messages"][:2]).accepted
    name, data, metadata = UPLOADS[upload]
    result = _prepare(tmp_path / upload, name, data, metadata)
    assert result.accepted, (result.reason, result.first_problems)
    # The same rows, split the same way (the split hashes the prompt_id, derived from the messages).
    rows = _rows(tmp_path / upload / "out")
    assert rows == _rows(tmp_path / "expected" / "out")
    assert sorted(row["messages"][1]["content"] for row in rows) == sorted(f"{q}\n{x}" for q, x, _ in EXCHANGES)
    report = json.loads((tmp_path / upload / "out" / REPORT_FILE).read_text())
    assert report["input"]["chat_format"] == CHAT_FORMATS[upload]
    assert report["input"]["mapping"] == {key.removeprefix("map_"): value for key, value in metadata.items()}


def test_multi_turn_sharegpt_keeps_every_turn_and_its_ids(tmp_path: Path) -> None:
    chats = list(conversations(12, seed=5))
    sharegpt = [{"prompt_id": chat["prompt_id"], "conversations": [
        {"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
        for m in chat["messages"]]} for chat in chats]  # fmt: skip
    result = _prepare(tmp_path, "chats.jsonl", _jsonl(sharegpt))
    assert result.accepted, result.reason
    by_id = {row["prompt_id"]: row["messages"] for row in _rows(tmp_path / "out")}
    assert by_id == {chat["prompt_id"]: chat["messages"] for chat in chats}


def test_the_command_line_maps_columns_as_metadata_does(tmp_path: Path) -> None:
    name, data, _ = UPLOADS["csv_mapped"]
    (tmp_path / name).write_bytes(data)
    result = subprocess.run(
        [sys.executable, "-m", "shared.cli", "prepare", str(tmp_path / name), "--out", str(tmp_path / "cli"),
         "--map", "user=question", "--map", "assistant=answer", "--map", "system=persona"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = _prepare(tmp_path / "expected", *UPLOADS["messages"][:2])
    assert expected.accepted and _rows(tmp_path / "cli") == _rows(tmp_path / "expected" / "out")
    wrong = subprocess.run(
        [sys.executable, "-m", "shared.cli", "prepare", str(tmp_path / name), "--out", str(tmp_path / "wrong"),
         "--map", "reply=answer"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert wrong.returncode == 1 and "map_reply='answer': a column mapping maps one of messages" in wrong.stderr
    assert "Traceback" not in wrong.stderr


def test_a_csv_record_with_more_or_fewer_fields_than_its_header_is_reported_with_its_line(tmp_path: Path) -> None:
    name, data, metadata = UPLOADS["csv_mapped"]
    result = _prepare(tmp_path, name, data + b'"one field only"\n', metadata)
    assert not result.accepted and list(result.report["errors"]) == ["csv_field_count"]
    # The twelve records before it hold a line break inside their quoted question: two lines each.
    assert result.first_problems == [
        "pairs.csv:26: the record has 1 fields; the header has 3 (question, answer, persona)"
    ]


def test_a_tsv_record_that_is_not_utf8_is_reported_with_its_line(tmp_path: Path) -> None:
    name, data, _ = UPLOADS["tsv_columns"]
    result = _prepare(tmp_path, name, data + b"s\t\xff\xfe\tx\n")
    assert not result.accepted and list(result.report["errors"]) == ["invalid_utf8"]
    assert result.first_problems == ["pairs.tsv:26: the record is not valid UTF-8 text"]


def _good(chat_format: str) -> list[bytes]:
    """Twelve good JSON Lines rows of a format."""
    name, data, _ = UPLOADS[chat_format]
    assert name.endswith(".jsonl")
    return data.splitlines()


# (file format, bad row, category, message): a row the file's format cannot convert, at line 13.
ROW_CASES = [
    ("alpaca", b'{"instruction": "no answer given"}', "format_fields_missing",
     "the row has instruction but not a whole format (alpaca needs instruction+output)"),
    ("alpaca", b'{"instruction": 5, "output": "x"}', "field_not_a_string", "'instruction' is int, not a string"),
    ("prompt_completion", b'{"prompt": "q", "completion": null}', "field_not_a_string",
     "'completion' is null, not a string"),
    ("sharegpt", b'{"conversations": "hello"}', "conversations_invalid",
     "'conversations' is not a non-empty list of {from, value} objects"),
    ("sharegpt", b'{"conversations": [{"from": "human"}]}', "conversations_invalid",
     "conversations[0] is not a {from, value} object"),
    ("sharegpt", b'{"conversations": [{"from": "bot", "value": "x"}]}', "unknown_role",
     "conversations[0].from is 'bot'; expected human, gpt or system"),
    ("messages", b'{"question": "q", "answer": "a"}', "unknown_format",
     "no chat format has the row's fields (question, answer): expected messages | conversations | "
     "instruction+output | prompt+completion | user+assistant, or a column mapping"),
]  # fmt: skip


@pytest.mark.parametrize(("chat_format", "row", "category", "message"), ROW_CASES,
                         ids=[f"{case[0]}-{case[2]}" for case in ROW_CASES])  # fmt: skip
def test_a_row_its_files_format_cannot_convert_is_reported_with_its_line(
    tmp_path: Path, chat_format: str, row: bytes, category: str, message: str
) -> None:
    rows = _good(chat_format)
    result = _prepare(tmp_path, "chats.jsonl", b"\n".join([*rows, row]) + b"\n")
    assert not result.accepted
    assert list(result.report["errors"]) == [category]
    assert result.first_problems == [f"chats.jsonl:13: {message}"]


def _mixed() -> bytes:
    return b"\n".join([*_good("sharegpt")[:4], _good("alpaca")[0]]) + b"\n"


# (upload name, content, category, one-line reason): the whole file is refused.
FILE_CASES: list[tuple[str, Callable[[Path], bytes], str, str]] = [
    ("chats.jsonl", lambda _: b'{"messages": [], "conversations": []}\n', "ambiguous_format",
     "line 1: the row fits messages (messages) and sharegpt (conversations): keep the fields of one format"),
    ("chats.jsonl", lambda _: _mixed(), "mixed_formats",
     "line 5: a alpaca (instruction+output) row in a sharegpt (conversations) file (its first row's): "
     "one format per file"),
    ("pairs.csv", lambda _: b'user,assistant\nq,a\n"x,y,z\nq,a,extra\n', "unreadable_csv",
     "the CSV file cannot be read at line 4: unexpected end of data (a quote opened before it is never closed)"),
    ("pairs.csv", lambda _: b"", "unreadable_csv", "the CSV file is empty: its first line names the columns"),
    ("pairs.csv", lambda _: b"us\xffer,assistant\nq,a\n", "unreadable_csv", "line 1: the CSV header is not valid"),
    ("pairs.csv", lambda _: b"user,user,assistant\nq,r,a\n", "unreadable_csv",
     "line 1: the CSV header names columns 'user' more than once or not at all"),
    ("pairs.tsv", lambda _: b"user\t\tassistant\nq\tr\ta\n", "unreadable_csv", "names columns '' more than once"),
    ("ref.hfdataset.json", lambda _: b"[" * 5000 + b"]" * 5000, "reference_invalid",
     "dataset reference: not a JSON object (RecursionError"),
    ("ref.hfdataset.json", lambda _: b'{"dataset": "a/b", "map": {"user": "text", "prompt": "text"}}',
     "reference_invalid", "column 'text' is mapped twice"),
    ("ref.hfdataset.json", lambda _: b'{"dataset": "a/b", "map": []}', "reference_invalid",
     "'map' must be an object of <field>: <column>"),
    ("ref.hfdataset.json", lambda _: b'{"dataset": ""}', "reference_invalid",
     "dataset reference: 'dataset' must name a dataset"),
    ("ref.hfdataset.json", lambda _: b'{"dataset": "a/b", "sample_percent": 0}', "reference_invalid",
     "dataset reference: 'sample_percent' is 0; expected a number above 0, at most 100"),
    ("ref.hfdataset.json", lambda _: b'{"dataset": "a/b", "splits": "x"}', "reference_invalid",
     "dataset reference: unknown field(s) splits"),
    ("ref.hfdataset.json", lambda tmp: json.dumps({"dataset": str(tmp / "nowhere")}).encode(), "dataset_unreachable",
     "cannot be read: FileNotFoundError: no folder"),
    ("ref.hfdataset.json", lambda tmp: json.dumps({"dataset": str(_shards(tmp)), "split": "validation"}).encode(),
     "dataset_unreachable", "cannot be read: ValueError: Bad split: validation. Available splits: ['test_sft', "
     "'train_sft']"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "content", "category", "reason"), FILE_CASES,
                         ids=[f"{case[2]}-{i}" for i, case in enumerate(FILE_CASES)])  # fmt: skip
def test_a_file_or_reference_that_cannot_be_read_is_refused_in_one_line(
    tmp_path: Path, name: str, content: Callable[[Path], bytes], category: str, reason: str
) -> None:
    result = _prepare(tmp_path, name, content(tmp_path))
    assert not result.accepted and reason in result.reason and "\n" not in result.reason
    assert list(result.report["errors"]) == [category]
    assert not (tmp_path / "out" / TRAIN_FILE).exists()


def test_a_mapping_that_swaps_two_columns_swaps_them(tmp_path: Path) -> None:
    rows = [{"user": a, "assistant": f"{q}\n{x}", "system": SYSTEM} for q, x, a in EXCHANGES]
    result = _prepare(tmp_path, "swapped.jsonl", _jsonl(rows), {"map_user": "assistant", "map_assistant": "user"})
    assert result.accepted, result.reason
    assert _prepare(tmp_path / "expected", *UPLOADS["messages"][:2]).accepted
    assert _rows(tmp_path / "out") == _rows(tmp_path / "expected" / "out")


def test_a_row_that_cannot_be_converted_keeps_its_text_in_the_rejected_rows(tmp_path: Path) -> None:
    rows = _good("alpaca")
    _prepare(tmp_path, "chats.jsonl", b"\n".join([*rows, b'{"instruction": 5, "output": "x"}']) + b"\n")
    (rejected,) = [json.loads(line) for line in (tmp_path / "out" / "rejected_rows.jsonl").read_text().splitlines()]
    assert rejected["line"] == 13 and rejected["text"] == '{"instruction": 5, "output": "x"}'


def test_ids_and_system_prompts_mean_the_same_in_every_format(tmp_path: Path) -> None:
    """A row's prompt_id decides its split in every format alike (an `id` in none); a `system`
    field comes first in the conversational prompt/completion and ShareGPT forms too."""
    ids = [f"conversation-{i:02d}" for i in range(len(EXCHANGES))]
    messages = [{"prompt_id": i, "messages": _messages(*e)} for i, e in zip(ids, EXCHANGES, strict=True)]
    sharegpt = [{"prompt_id": i, "id": "ignored", "system": SYSTEM,
                 "conversations": [{"from": "human", "value": f"{q}\n{x}"}, {"from": "gpt", "value": a}]}
                for i, (q, x, a) in zip(ids, EXCHANGES, strict=True)]  # fmt: skip
    conversational = [{"prompt_id": i, "system": SYSTEM, "prompt": _messages(*e)[1:2], "completion": _messages(*e)[2:]}
                      for i, e in zip(ids, EXCHANGES, strict=True)]  # fmt: skip
    expected = _prepare(tmp_path / "messages", "chats.jsonl", _jsonl(messages))
    assert expected.accepted
    for name, rows in (("sharegpt", sharegpt), ("conversational", conversational)):
        result = _prepare(tmp_path / name, "chats.jsonl", _jsonl(rows))
        assert result.accepted, result.reason
        assert _rows(tmp_path / name / "out") == _rows(tmp_path / "messages" / "out"), name
    both = [{**conversational[0], "prompt": _messages(*EXCHANGES[0])[:2]}]
    refused = _prepare(tmp_path / "both", "chats.jsonl", _jsonl(both))
    assert "has a 'system' field and its conversation a system message" in refused.first_problems[0]


def test_a_reference_may_name_a_folder_of_the_machine_only_where_that_is_allowed(tmp_path: Path) -> None:
    reference = json.dumps({"dataset": str(_shards(tmp_path)), "split": "train_sft"}).encode()
    chunks = [reference]
    refused = prepare_dataset(chunks, tmp_path / "out", InputInfo("support.hfdataset.json"), DatasetSettings(),
                              local_folders=False)  # fmt: skip
    assert (
        not refused.accepted and "is a folder on the app's machine, which an upload cannot name here" in refused.reason
    )


def _shards(tmp_path: Path) -> Path:
    """A `datasets` folder as the Hub keeps ultrachat_200k: Parquet shards per split under data/."""
    folder = tmp_path / "ultrachat_like"
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    rows = list(conversations(60, seed=11))
    for index, shard in enumerate((rows[:25], rows[25:50])):
        (data / f"train_sft-0000{index}-of-00002.parquet").write_bytes(_parquet(shard))
    (data / "test_sft-00000-of-00001.parquet").write_bytes(_parquet(rows[50:]))
    return folder


@pytest.mark.parametrize("sample", [None, 50])
def test_a_referenced_datasets_folder_prepares_as_the_same_rows_uploaded(tmp_path: Path, sample: int | None) -> None:
    folder = _shards(tmp_path)
    reference = {"dataset": str(folder), "split": "train_sft", **({"sample_percent": sample} if sample else {})}
    referenced = _prepare(tmp_path / "ref", "support.hfdataset.json", json.dumps(reference).encode())
    assert referenced.accepted, referenced.reason
    same = _jsonl(list(conversations(60, seed=11))[:50])
    uploaded = _prepare(tmp_path / "jsonl", "support.jsonl", same, {"sample_pc": str(sample)} if sample else {})
    assert _rows(tmp_path / "ref" / "out") == _rows(tmp_path / "jsonl" / "out")
    assert (
        referenced.report["rows"] == uploaded.report["rows"] and referenced.report["split"] == uploaded.report["split"]
    )
    source = referenced.report["input"]["source"]
    assert source["dataset"] == str(folder) and source["split"] == "train_sft"
    assert source["revision"].startswith("local:") and referenced.report["input"]["format"] == "hfdataset"
    assert source["files"] == 2 and source["file_types"] == ["parquet"]
    # The same files give the same revision; another shard, another one.
    again = _prepare(tmp_path / "again", "support.hfdataset.json", json.dumps(reference).encode())
    assert again.report["input"]["source"]["revision"] == source["revision"]
    (folder / "data" / "train_sft-00002-of-00002.parquet").write_bytes(_parquet(list(conversations(3, seed=12))))
    grown = _prepare(tmp_path / "grown", "support.hfdataset.json", json.dumps(reference).encode())
    assert grown.report["input"]["source"]["revision"] != source["revision"]
    assert grown.report["rows"]["total"] == 53


def test_a_hub_dataset_that_cannot_be_reached_is_rejected_in_one_line_naming_it(tmp_path: Path) -> None:
    reference = tmp_path / "chats.hfdataset.json"
    reference.write_text(json.dumps({"dataset": "nobody-at-all/no-such-dataset", "split": "train"}))
    result = subprocess.run(
        [sys.executable, "-m", "shared.cli", "prepare", str(reference), "--out", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},  # no network in tests: the Hub is out of reach
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith(f"{reference}: rejected: dataset 'nobody-at-all/no-such-dataset' cannot be read: "
                            "OfflineModeIsEnabled: ")  # fmt: skip


def test_a_hub_dataset_that_does_not_exist_is_rejected_with_the_hubs_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Hub's own answer for a repository that does not exist, as huggingface_hub raises it."""
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    def missing(self: HfApi, repo_id: str, **kwargs: Any) -> None:
        response = httpx.Response(404, request=httpx.Request("GET", f"https://huggingface.co/api/datasets/{repo_id}"))
        raise RepositoryNotFoundError(f"404 Client Error. Repository Not Found for url: {response.url}.",
                                      response=response)  # fmt: skip

    monkeypatch.setattr(HfApi, "dataset_info", missing)
    result = _prepare(tmp_path, "chats.hfdataset.json", b'{"dataset": "nobody-at-all/no-such-dataset"}')
    assert result.reason.startswith("dataset 'nobody-at-all/no-such-dataset' cannot be read: RepositoryNotFoundError: "
                                    "404 Client Error. Repository Not Found")  # fmt: skip
    assert "\n" not in result.reason
