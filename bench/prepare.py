"""Dataset preparation speed and memory, against a parse-only floor and the pandas and datasets
ways of doing the same job, all measured in one run on one generated file.

Each approach runs in its own process so its peak RSS is its own. Goals: prepare at most 1.5x
the parse floor, at least 10x faster than pandas, peak RSS at most 100 MB. A second floor, parse
and write every line back out, shows what the output writes alone cost on this machine.
Usage: .venv/bin/python bench/prepare.py [--rows 207865] [--skip-slow]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def parse_floor(path: Path, out: Path) -> None:
    import orjson

    with path.open("rb") as source:
        for line in source:
            orjson.loads(line)


def parse_and_copy_floor(path: Path, out: Path) -> None:
    """Parse every line and write it out again: the least any job that writes its split can do."""
    import orjson

    with path.open("rb") as source, (out / "copy.jsonl").open("wb", buffering=1 << 20) as target:
        for line in source:
            orjson.loads(line)
            target.write(line)


def prepare(path: Path, out: Path) -> None:
    from shared.datasets.prepare import InputInfo, prepare_dataset
    from shared.datasets.sources import file_chunks
    from shared.settings import DatasetSettings

    with path.open("rb") as source:
        result = prepare_dataset(file_chunks(source), out, InputInfo(path.name), DatasetSettings())
    assert result.accepted, result.reason


def with_pandas(path: Path, out: Path) -> None:
    import pandas as pd

    frame = pd.read_json(path, lines=True)
    test = frame.sample(frac=0.05, random_state=0)
    frame.drop(test.index).to_json(out / "train_sft.jsonl", orient="records", lines=True)
    test.to_json(out / "test_sft.jsonl", orient="records", lines=True)


def with_datasets(path: Path, out: Path) -> None:
    import datasets

    datasets.disable_progress_bars()
    data = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(out / "cache"))
    split = data.train_test_split(test_size=0.05, seed=0)
    split["train"].to_json(out / "train_sft.jsonl")
    split["test"].to_json(out / "test_sft.jsonl")


APPROACHES = {
    "parse_floor": parse_floor,
    "parse_and_copy_floor": parse_and_copy_floor,
    "prepare": prepare,
    "pandas": with_pandas,
    "datasets": with_datasets,
}


def measure(name: str, path: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        code = (
            "import sys, time, json, resource; sys.path.insert(0, sys.argv[1]); "
            "from bench.prepare import APPROACHES; from pathlib import Path; "
            "t = time.perf_counter(); APPROACHES[sys.argv[2]](Path(sys.argv[3]), Path(sys.argv[4])); "
            "print(json.dumps({'seconds': time.perf_counter() - t, "
            "'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))"
        )
        result = subprocess.run(
            [sys.executable, "-c", code, str(REPO), name, str(path), out],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        )
        return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=207_865, help="conversations in the generated file")
    parser.add_argument("--answer-sentences", type=int, default=90, help="longest answer, in sentences")
    parser.add_argument("--skip-slow", action="store_true", help="leave out pandas and datasets")
    args = parser.parse_args()

    from shared.datasets.sample import write_sample

    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "ultrachat_like.jsonl"
        started = time.perf_counter()
        write_sample(path, args.rows, seed=207, answer_sentences=args.answer_sentences)
        size_gb = path.stat().st_size / 1e9
        print(f"generated {size_gb:.2f} GB, {args.rows} rows in {time.perf_counter() - started:.0f} s")
        names = ["parse_floor", "parse_and_copy_floor", "prepare"] + ([] if args.skip_slow else ["pandas", "datasets"])
        results = {name: measure(name, path) for name in names}
    prep = results["prepare"]
    summary = {
        "file_gb": round(size_gb, 2),
        "rows": args.rows,
        "results": {name: {k: round(v, 2) for k, v in r.items()} for name, r in results.items()},
        "prepare_vs_parse_floor": round(prep["seconds"] / results["parse_floor"]["seconds"], 2),
        "prepare_vs_parse_and_copy_floor": round(prep["seconds"] / results["parse_and_copy_floor"]["seconds"], 2),
        "prepare_peak_rss_mb": round(prep["peak_rss_mb"], 1),
    }
    for slow in ("pandas", "datasets"):
        if slow in results:
            summary[f"{slow}_vs_prepare"] = round(results[slow]["seconds"] / prep["seconds"], 1)
    goals = {
        "prepare <= 1.5x parse floor": summary["prepare_vs_parse_floor"] <= 1.5,
        "peak RSS <= 100 MB": summary["prepare_peak_rss_mb"] <= 100,
    }
    if "pandas_vs_prepare" in summary:
        goals["pandas >= 10x slower"] = summary["pandas_vs_prepare"] >= 10
    summary["goals_met"] = goals
    print(json.dumps(summary, indent=2))
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
