"""Preparing a file on two cores (`prepare_file`): the same outputs and report as the one-piece
preparation, byte for byte, whether the two parts are kept or the file is prepared again whole."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import orjson
import pytest

from shared.datasets import parts
from shared.datasets.parts import prepare_file
from shared.datasets.prepare import InputInfo, Preparation, prepare_dataset
from shared.datasets.sample import conversations
from shared.datasets.sources import BOM, file_chunks
from shared.settings import DatasetSettings
from shared.vocabulary import REJECTED_FILE, REPORT_FILE, TEST_FILE, TRAIN_FILE

DEFAULTS = DatasetSettings()
ROWS = [orjson.dumps(row) for row in conversations(120, seed=11)]


def _chat(*turns: tuple[str, str], **extra: Any) -> bytes:
    return orjson.dumps({"messages": [{"role": r, "content": c} for r, c in turns], **extra})


def _sharegpt(row: bytes) -> bytes:
    value = orjson.loads(row)
    names = {"user": "human", "assistant": "gpt"}
    return orjson.dumps(
        {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in value["messages"]]}
    )


def _both_ways(tmp_path: Path, lines: list[bytes], monkeypatch: pytest.MonkeyPatch,
               metadata: dict[str, str] | None = None,
               settings: DatasetSettings = DEFAULTS) -> tuple[Preparation, int]:  # fmt: skip
    """Prepare the file whole and in parts; assert the results are the same. Returns the one made
    in parts and how many times it fell back to preparing the file whole."""
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "chats.jsonl"
    path.write_bytes(b"".join(line if line.endswith(b"\n") else line + b"\n" for line in lines))
    info = InputInfo(str(path), path.stat().st_size)
    with path.open("rb") as data:
        whole = prepare_dataset(file_chunks(data), tmp_path / "whole", info, settings, metadata)
    fell_back = []

    def one_piece(*args: Any, **kwargs: Any) -> Preparation:
        fell_back.append(args)
        return prepare_dataset(*args, **kwargs)

    monkeypatch.setattr(parts, "prepare_dataset", one_piece)
    in_parts = prepare_file(path, tmp_path / "parts", info, settings, metadata, min_parallel_bytes=0)
    for name in (TRAIN_FILE, TEST_FILE, REJECTED_FILE):
        made, expected = tmp_path / "parts" / name, tmp_path / "whole" / name
        assert made.exists() == expected.exists(), name
        if expected.exists():
            assert made.read_bytes() == expected.read_bytes(), name
    report = json.loads((tmp_path / "parts" / REPORT_FILE).read_text())
    assert report == json.loads((tmp_path / "whole" / REPORT_FILE).read_text())
    assert (in_parts.accepted, in_parts.reason, in_parts.first_problems) == (
        whole.accepted, whole.reason, whole.first_problems
    )  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == sorted(
        p.name for p in (tmp_path / "whole").iterdir()
    )
    return in_parts, len(fell_back)


def test_a_clean_file_is_prepared_in_two_parts_as_it_would_be_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    late = [
        ROWS[-1],  # a duplicate within the second part
        _chat(("user", "hi"), ("user", "again"), ("assistant", "hello")),  # a warning, with its line
        _chat(("user", "what now?"), ("assistant", "this"), ("user", "and then?")),  # rewritten: ends with user
        b"  " + _chat(("user", "padded"), ("assistant", "line")) + b"  \r",
        _chat(("user", "x" * 9_000), ("assistant", "long")),  # over max_seq_length
    ]
    prepared, fell_back = _both_ways(tmp_path, [*ROWS, b"", *late], monkeypatch)
    assert fell_back == 0 and prepared.accepted
    warnings = prepared.report["warnings"]
    assert warnings["duplicate_prompt_id"]["first_lines"] == [len(ROWS) + 2]
    assert warnings["consecutive_same_role"]["first_lines"] == [len(ROWS) + 3]


def test_invalid_rows_in_the_first_part_keep_the_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [ROWS[0], b'{"messages": [', *ROWS[1:]]
    prepared, fell_back = _both_ways(tmp_path, lines, monkeypatch, settings=DatasetSettings(max_invalid_fraction=0.1))
    assert fell_back == 0 and prepared.accepted
    assert prepared.first_problems == [
        f"{tmp_path / 'chats.jsonl'}:2: invalid JSON at column 15: unexpected end of data"
    ]


@pytest.mark.parametrize(
    "late",
    [
        pytest.param([b'{"messages": ['], id="an invalid row"),
        pytest.param([ROWS[3]], id="a row the first part holds"),
        pytest.param([orjson.dumps({**orjson.loads(ROWS[5]), "prompt_id": "another"})], id="its messages"),
        pytest.param([_sharegpt(ROWS[0])], id="another chat format"),
        pytest.param([BOM + ROWS[0].replace(b"{", b"[", 1)], id="a BOM and an array's bracket"),
    ],
)
def test_a_second_part_that_reads_differently_after_the_first_is_prepared_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, late: list[bytes]
) -> None:
    _, fell_back = _both_ways(tmp_path, [*ROWS, *late], monkeypatch)
    assert fell_back == 1


def test_other_chat_formats_and_mappings_are_prepared_in_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, fell_back = _both_ways(tmp_path, [_sharegpt(row) for row in ROWS], monkeypatch)
    assert fell_back == 0
    renamed = [row.replace(b'"messages"', b'"turns_of_talk"') for row in ROWS]
    _, fell_back = _both_ways(tmp_path / "mapped", renamed, monkeypatch, metadata={"map_messages": "turns_of_talk"})
    assert fell_back == 0


def test_a_file_that_is_not_json_lines_is_prepared_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prepared, fell_back = _both_ways(tmp_path, [b"[" + b",".join(ROWS) + b"]"], monkeypatch)
    assert not prepared.accepted and "single JSON array" in prepared.reason
    assert fell_back == 1


def test_a_child_that_dies_while_sending_leaves_the_file_prepared_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def dies_halfway(pipe: int, *args: Any) -> None:  # runs in the forked child
        with os.fdopen(pipe, "wb") as out:
            out.write(pickle.dumps(list(range(1000)))[:100])
        os._exit(1)

    monkeypatch.setattr(parts, "_first_part", dies_halfway)
    _, fell_back = _both_ways(tmp_path, ROWS, monkeypatch)  # also: no part file left behind
    assert fell_back == 1
