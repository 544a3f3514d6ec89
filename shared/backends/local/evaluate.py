"""Models' losses on held-out conversations: `python -m shared.backends.local.evaluate TEST_FILE
MODEL...` prints `[{"model": ..., "loss": ..., "tokens": ...}, ...]`, one per MODEL, each a
registered MLflow model folder or a base model (a Hugging Face folder), loaded in turn. Run as its
own process so the function host never loads a model.

The loss is what the trainer minimises and reports as `eval_loss`: cross-entropy on assistant
tokens only, here averaged over every such token of the file (one conversation per forward pass:
no padding, no batch effects), so two models on the same file compare exactly."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from shared.backends.local import served_model
from shared.backends.local.trainer import DEFAULT_MAX_LENGTH, tokenize_conversations


def _load(model: Path) -> tuple[Any, Any]:
    if (model / "MLmodel").exists():
        loaded = served_model.load(model)
        if served_model.is_adapter(model):
            served_model.add_adapter(loaded, "evaluated", model)
        return loaded.model, loaded.tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model).eval(), AutoTokenizer.from_pretrained(model)


def held_out_loss(model_path: Path, test_file: Path) -> dict[str, Any]:
    import torch

    model, tokenizer = _load(model_path)
    examples, _ = tokenize_conversations(test_file, tokenizer, DEFAULT_MAX_LENGTH)
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example.input_ids], device=device)
            logits = model(input_ids=ids).logits[0, :-1].float()
            labels = torch.tensor(example.labels[1:], device=device)
            scored = labels != -100
            total += torch.nn.functional.cross_entropy(logits[scored], labels[scored], reduction="sum").item()
            tokens += int(scored.sum())
    if not tokens:
        raise ValueError(f"{test_file}: no assistant token to score")
    return {"model": str(model_path), "loss": total / tokens, "tokens": tokens}


def main(argv: list[str]) -> int:
    try:
        print(json.dumps([held_out_loss(Path(model), Path(argv[0])) for model in argv[1:]]))
    except Exception as error:  # one line for the caller's error message, never a traceback
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
