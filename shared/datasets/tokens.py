"""Exact token counts of a prepared upload: each conversation rendered with the base model's own
chat template and tokenizer (a transformers tokenizer, loaded by whoever has one at hand), as
training will see it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from shared.datasets.prepare import Histogram, Preparation, token_statistics, training_tokens
from shared.vocabulary import TEST_FILE, TRAIN_FILE


def count_tokens(
    train: Path, test: Path, tokenizer: Any, name: str, max_seq_length: int, epochs: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(token statistics over both files, training tokens): each train conversation counts up to
    `max_seq_length`, where training truncates it."""
    counts, over, per_epoch = Histogram(), 0, 0
    for path, trains in ((train, True), (test, False)):
        with path.open("rb") as rows:
            for line in rows:
                ids = tokenizer.apply_chat_template(orjson.loads(line)["messages"], tokenize=True, return_dict=True)
                length = len(ids["input_ids"])
                counts.add(length)
                over += length > max_seq_length
                if trains:
                    per_epoch += min(length, max_seq_length)
    return token_statistics(f"exact: the {name} tokenizer and chat template", counts, over), training_tokens(
        per_epoch, epochs
    )


def count_into_report(preparation: Preparation, tokenizer: Any) -> None:
    """Replace the preparation's estimated token statistics with the tokenizer's exact counts."""
    report = preparation.report
    statistics = report["statistics"]
    name = str(getattr(tokenizer, "name_or_path", "") or "base model").rstrip("/").rsplit("/", 1)[-1]
    statistics["tokens"], statistics["training_tokens"] = count_tokens(
        preparation.out_dir / TRAIN_FILE, preparation.out_dir / TEST_FILE, tokenizer, name,
        report["settings"]["effective_max_seq_length"], statistics["training_tokens"]["epochs"],
    )  # fmt: skip
