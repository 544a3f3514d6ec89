"""Seeded, ultrachat_200k-shaped sample conversations: the project's own data for the demo,
tests, benchmarks and the built-in tokenizer (no hub can be reached to fetch the real set)."""

from __future__ import annotations

import gzip
import hashlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

_SUBJECTS = (
    "the water cycle", "compound interest", "photosynthesis", "a sourdough starter", "binary search",
    "the French Revolution", "solar panels", "vaccines", "jazz harmony", "plate tectonics", "recursion",
    "a marathon plan", "coral reefs", "supply and demand", "the immune system", "black holes",
    "container gardening", "public speaking", "electric cars", "the Roman Empire", "sleep hygiene",
    "machine translation", "volcanoes", "budgeting", "chess openings", "bread baking", "cloud computing",
)  # fmt: skip
_QUESTIONS = (
    "Can you explain {s} in simple terms?", "What are the key ideas behind {s}?",
    "Write a short guide to {s} for a beginner.", "Why does {s} matter today?",
    "Give me three surprising facts about {s}.", "How would you teach {s} to a ten-year-old?",
    "What are common mistakes people make with {s}?", "Summarize the history of {s}.",
)  # fmt: skip
_FOLLOW_UPS = (
    "Can you give an example?", "How does that compare with the alternatives?", "What should I read next?",
    "Could you make that shorter?", "What is the most important point?", "Is there a common misconception?",
)  # fmt: skip
_WORDS = (
    "the first step is to understand how each part works together and why it matters",
    "in practice most people start small, measure the result, and adjust as they learn",
    "a useful way to think about it is as a cycle that repeats until it settles",
    "experts usually point to three factors: timing, scale, and the quality of inputs",
    "for example, a simple experiment at home shows the effect within a few days",
    "the main risk is rushing; patience and careful notes make a real difference",
    "historically this idea developed slowly, with many small improvements over time",
    "it helps to compare it with something familiar, like cooking or keeping a garden",
    "researchers still debate the details, but the broad picture is well established",
    "to sum up, focus on the fundamentals and the rest follows naturally",
)  # fmt: skip


def _answer(rng: random.Random, subject: str, sentences: int) -> str:
    body = ". ".join(s.capitalize() for s in rng.choices(_WORDS, k=sentences))
    return f"Here is an overview of {subject}. {body}."


def conversation(rng: random.Random, answer_sentences: int = 4) -> dict[str, Any]:
    """One ultrachat-shaped row: prompt, prompt_id (sha256 hex of the prompt), messages."""
    subject = rng.choice(_SUBJECTS)
    prompt = rng.choice(_QUESTIONS).format(s=subject) + f" (#{rng.randrange(10**9)})"
    messages = [{"content": prompt, "role": "user"}]
    for turn in range(rng.randint(1, 3)):
        if turn:
            messages.append({"content": rng.choice(_FOLLOW_UPS), "role": "user"})
        messages.append({"content": _answer(rng, subject, rng.randint(1, answer_sentences)), "role": "assistant"})
    return {"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(), "messages": messages}


def conversations(count: int, seed: int = 0, answer_sentences: int = 4) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    for _ in range(count):
        yield conversation(rng, answer_sentences)


def write_sample(path: Path, count: int, seed: int = 0, answer_sentences: int = 4) -> Path:
    """Write `count` conversations as JSON Lines (gzip-compressed when the name ends in .gz)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wb") as out:
        for row in conversations(count, seed, answer_sentences):
            out.write(orjson.dumps(row) + b"\n")
    return path
