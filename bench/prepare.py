"""Dataset preparation speed and memory, against a parse-only floor and the pandas (and, with
--datasets, the datasets) way of doing the same job, measured in one run on generated files of
each size asked for (default 0.3 and 1.5 GB).

`prepare` is the whole `python -m shared.cli prepare` process, timed from outside: interpreter
start, imports, both cores' work and the outputs written. The parse floor is orjson parsing every
line in a process already started, writing nothing. Each approach runs in a process of its own so
its peak RSS is its own (for `prepare`, the larger of the command's and its child's). Goals, on each
size: prepare at most 1.5x the parse floor, at least 10x faster than pandas, peak RSS at most
100 MB. A second floor, parse and write every line back out, shows what the output writes alone
cost on this machine.

With --formats, the same conversations are written in each chat format and file type an upload
may take (about --gb each) and prepared: each format's throughput, its ratio to the `messages`
JSON Lines baseline of the same run, and its peak RSS (goal: at most 100 MB on each).
Usage: .venv/bin/python bench/prepare.py [--sizes-gb 0.3 1.5] [--skip-slow] [--datasets]
       .venv/bin/python bench/prepare.py --formats [--gb 1.5]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    """The command a user runs, as a process of its own (its start and imports counted)."""
    mapping = path.with_name(path.name + ".map")
    columns = json.loads(mapping.read_text()) if mapping.exists() else {}
    maps = [f"--map={field.removeprefix('map_')}={column}" for field, column in columns.items()]
    done = subprocess.run([sys.executable, "-m", "shared.cli", "prepare", str(path), "--out", str(out), *maps],
                          cwd=REPO, capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr


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


def _exchange(row: dict[str, Any]) -> tuple[str, str]:
    return row["messages"][0]["content"], row["messages"][1]["content"]


def _sharegpt(row: dict[str, Any]) -> dict[str, Any]:
    roles = {"user": "human", "assistant": "gpt"}
    return {"id": row["prompt_id"], "conversations": [{"from": roles[m["role"]], "value": m["content"]}
                                                        for m in row["messages"]]}  # fmt: skip


# Each JSON Lines format: (file name, how one conversation is written in it). One-exchange formats
# take the conversation's first exchange; CSV and TSV hold it in two columns, read through a mapping.
JSONL_FORMATS: dict[str, tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]] = {
    "messages": ("chats.jsonl", lambda row: row),
    "sharegpt": ("chats.jsonl", _sharegpt),
    "alpaca": ("chats.jsonl", lambda row: dict(zip(("instruction", "output"), _exchange(row), strict=True))),
    "prompt_completion": ("chats.jsonl", lambda row: dict(zip(("prompt", "completion"), _exchange(row), strict=True))),
}  # fmt: skip


def write_format(kind: str, folder: Path, target_bytes: int, answer_sentences: int) -> tuple[Path, int]:
    """About `target_bytes` of conversations (as JSON) in format `kind` (one of FORMATS): the file
    to prepare, and how many conversations it holds."""
    import orjson

    from shared.datasets.sample import conversations

    rows = conversations(10**9, seed=207, answer_sentences=answer_sentences)
    if kind in JSONL_FORMATS:
        name, convert = JSONL_FORMATS[kind]
        path = folder / kind / name
        path.parent.mkdir(parents=True)
        count = 0
        with path.open("wb", buffering=1 << 20) as out:
            while out.tell() < target_bytes:
                out.write(orjson.dumps(convert(next(rows))) + b"\n")
                count += 1
        return path, count
    if kind in ("csv", "tsv"):
        path = folder / kind / f"pairs.{kind}"
        path.parent.mkdir(parents=True)
        path.with_name(path.name + ".map").write_text(json.dumps({"map_user": "question", "map_assistant": "answer"}))
        count = 0
        with path.open("w", newline="", buffering=1 << 20) as out:
            writer = csv.writer(out, delimiter="," if kind == "csv" else "\t")
            writer.writerow(["question", "answer"])
            while out.tell() < target_bytes:
                writer.writerow(_exchange(next(rows)))
                count += 1
        return path, count
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = folder / kind / ("data/train-00000-of-00001.parquet" if kind == "hfdataset" else "chats.parquet")
    path.parent.mkdir(parents=True)
    written = count = 0
    message = pa.struct([("content", pa.string()), ("role", pa.string())])
    schema = pa.schema([("prompt", pa.string()), ("prompt_id", pa.string()), ("messages", pa.list_(message))])
    with pq.ParquetWriter(path, schema) as writer:
        while written < target_bytes:
            batch = [next(rows) for _ in range(2000)]
            written += sum(len(orjson.dumps(row)) for row in batch)  # the JSON it stands for
            writer.write_table(pa.Table.from_pylist(batch, schema=writer.schema))
            count += len(batch)
    if kind == "hfdataset":
        reference = folder / kind / "chats.hfdataset.json"
        reference.write_text(json.dumps({"dataset": str(folder / kind), "split": "train"}))
        return reference, count
    return path, count


FORMATS = (*JSONL_FORMATS, "csv", "tsv", "parquet", "hfdataset")


def measure(name: str, path: Path) -> dict[str, float]:
    """Time and peak RSS of one approach in a process of its own. The peak is the process's own
    memory's high-water mark (VmHWM): getrusage's ru_maxrss keeps the parent's peak across the
    fork and exec that start the child, so a parent that generated data would inflate it."""
    with tempfile.TemporaryDirectory() as out:
        code = (
            "import sys, time, json, re, resource; sys.path.insert(0, sys.argv[1]); "
            "from bench.prepare import APPROACHES; from pathlib import Path; "
            "t = time.perf_counter(); APPROACHES[sys.argv[2]](Path(sys.argv[3]), Path(sys.argv[4])); "
            "seconds = time.perf_counter() - t; "
            "own = int(re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read()).group(1)); "
            "children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss; "
            "print(json.dumps({'seconds': seconds, 'peak_rss_mb': max(own, children) / 1024}))"
        )
        result = subprocess.run(
            [sys.executable, "-c", code, str(REPO), name, str(path), out],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        )
        return json.loads(result.stdout.strip().splitlines()[-1])


def _data_bytes(path: Path) -> int:
    """The bytes the preparation reads: the file, or the folder a reference names."""
    if path.name.endswith(".hfdataset.json"):
        return sum(p.stat().st_size for p in path.parent.rglob("*.parquet"))
    return path.stat().st_size


def formats(args: argparse.Namespace) -> int:
    """Each format's preparation throughput and peak RSS, beside the messages baseline."""
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for kind in FORMATS:
            started = time.perf_counter()
            path, rows = write_format(kind, Path(work), int(args.gb * 1e9), args.answer_sentences)
            size = _data_bytes(path)
            print(f"{kind}: wrote {size / 1e9:.2f} GB in {time.perf_counter() - started:.0f} s", file=sys.stderr)
            measured = measure("prepare", path)
            results[kind] = {"file_gb": round(size / 1e9, 2), "rows": rows, "seconds": round(measured["seconds"], 1),
                             "mb_per_second": round(size / 1e6 / measured["seconds"], 1),
                             "rows_per_second": round(rows / measured["seconds"]),
                             "peak_rss_mb": round(measured["peak_rss_mb"], 1)}  # fmt: skip
            for folder in (path.parent.parent if kind == "hfdataset" else path.parent,):
                subprocess.run(["rm", "-rf", str(folder)], check=True)  # one format's file at a time on disk
    baseline = results["messages"]
    for result in results.values():
        result["mb_per_second_vs_messages_jsonl"] = round(result["mb_per_second"] / baseline["mb_per_second"], 2)
        result["rows_per_second_vs_messages_jsonl"] = round(result["rows_per_second"] / baseline["rows_per_second"], 2)
    # Parquet and dataset references are reported, not held to the goal: pyarrow's import alone is
    # 59 MB and datasets' 135 MB; what reading adds is bound by a row group, not by the file.
    goals = {
        f"{kind}: peak RSS <= 100 MB": results[kind]["peak_rss_mb"] <= 100 for kind in (*JSONL_FORMATS, "csv", "tsv")
    }
    print(json.dumps({"formats": results, "goals_met": goals}, indent=2))
    return 0 if all(goals.values()) else 1


ROWS_PER_GB = 138_577  # of the generated conversations, at the default answer length


def one_size(size_gb: float, args: argparse.Namespace) -> dict[str, Any]:
    """Every approach on one generated file of about `size_gb`, with the ratios and goals."""
    from shared.datasets.sample import write_sample

    rows = round(size_gb * ROWS_PER_GB)
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "ultrachat_like.jsonl"
        started = time.perf_counter()
        write_sample(path, rows, seed=207, answer_sentences=args.answer_sentences)
        size = path.stat().st_size
        print(f"generated {size / 1e9:.2f} GB, {rows} rows in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        slow = [] if args.skip_slow else ["pandas", *(["datasets"] if args.datasets else [])]
        results = {name: measure(name, path) for name in ["parse_floor", "parse_and_copy_floor", "prepare", *slow]}
    prep = results["prepare"]
    summary: dict[str, Any] = {
        "file_gb": round(size / 1e9, 2),
        "rows": rows,
        "results": {name: {k: round(v, 2) for k, v in r.items()} for name, r in results.items()},
        "prepare_vs_parse_floor": round(prep["seconds"] / results["parse_floor"]["seconds"], 2),
        "prepare_vs_parse_and_copy_floor": round(prep["seconds"] / results["parse_and_copy_floor"]["seconds"], 2),
        "prepare_peak_rss_mb": round(prep["peak_rss_mb"], 1),
    }
    for name in slow:
        summary[f"{name}_vs_prepare"] = round(results[name]["seconds"] / prep["seconds"], 1)
    goals = {
        "prepare <= 1.5x parse floor": summary["prepare_vs_parse_floor"] <= 1.5,
        "peak RSS <= 100 MB": summary["prepare_peak_rss_mb"] <= 100,
    }
    if "pandas_vs_prepare" in summary:
        goals["pandas >= 10x slower"] = summary["pandas_vs_prepare"] >= 10
    return {**summary, "goals_met": goals}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[0.3, 1.5], help="the generated files' sizes")
    parser.add_argument("--answer-sentences", type=int, default=90, help="longest answer, in sentences")
    parser.add_argument("--skip-slow", action="store_true", help="leave out pandas (and datasets)")
    parser.add_argument("--datasets", action="store_true", help="also measure the datasets library")
    parser.add_argument("--formats", action="store_true", help="each chat format and file type instead")
    parser.add_argument("--gb", type=float, default=1.5, help="with --formats: the size of each format's file")
    args = parser.parse_args()
    if args.formats:
        return formats(args)
    sizes = {f"{size:g}_gb": one_size(size, args) for size in args.sizes_gb}
    print(json.dumps(sizes, indent=2))
    return 0 if all(all(size["goals_met"].values()) for size in sizes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
