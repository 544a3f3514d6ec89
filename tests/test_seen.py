"""The duplicate check's table of hashes: exact, whatever the values, however many."""

from __future__ import annotations

import random

from shared.datasets.seen import SeenHashes


def test_every_value_is_new_once_and_seen_after_through_every_growth() -> None:
    rng = random.Random(7)
    values = [rng.getrandbits(64) - (1 << 63) for _ in range(50_000)] + [0, 1, -1, (1 << 63) - 1, -(1 << 63)]
    seen = SeenHashes(capacity=4)
    assert all(seen.add(value) for value in values)
    assert not any(seen.add(value) for value in values)
    assert len(seen) == len(values)
