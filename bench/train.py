"""Training throughput: our local trainer against a plain trl SFTTrainer, same tiny model, same
data, same LoRA and batch settings, in the same process, alternating runs.

Both train on assistant tokens only; tokens per second count real (not padding) tokens. Goals:
at least 1.0x as is, and at least 1.5x with packing on short conversations.
Usage: .venv/bin/python bench/train.py [--steps 40] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shared.backends.local.jobs import JobSpec  # noqa: E402
from shared.backends.local.settings import TINY_PHI3  # noqa: E402
from shared.backends.local.tiny_model import build_tiny_phi3  # noqa: E402
from shared.backends.local.trainer import tokenize_conversations, train  # noqa: E402
from shared.datasets.prepare import InputInfo, prepare_dataset  # noqa: E402
from shared.datasets.sample import write_sample  # noqa: E402
from shared.datasets.sources import file_chunks  # noqa: E402
from shared.settings import DatasetSettings  # noqa: E402
from shared.vocabulary import TEST_FILE, TRAIN_FILE  # noqa: E402

LORA = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0}
BATCH = 4
MAX_LENGTH = 512


def ours(work: Path, prepared: Path, steps: int, round_number: int, packing: bool = False) -> float:
    job = work / f"ours-{prepared.name}-{round_number}-{packing}"
    (job / "inputs").mkdir(parents=True)
    for name in (TRAIN_FILE, TEST_FILE):
        (job / "inputs" / name).write_bytes((prepared / name).read_bytes())
    (job / "inputs" / TEST_FILE).write_text("")  # measure training only, as for trl
    spec = JobSpec(
        job_name=job.name,
        base_model=TINY_PHI3,
        parameters={
            "max_steps": steps,
            "per_device_train_batch_size": BATCH,
            "learning_rate": 1e-3,
            "max_seq_length": MAX_LENGTH,
            **LORA,
        },
        experiment_name="bench",
        tracking_uri=f"sqlite:///{work / 'mlflow.db'}",
        models_dir=str(work / "models"),
    )
    return train(job, spec)["tokens_per_second"]


def trl_baseline(work: Path, prepared: Path, steps: int, round_number: int) -> float:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    base = build_tiny_phi3(work / "models" / TINY_PHI3)
    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = [json.loads(line) for line in (prepared / TRAIN_FILE).read_text().splitlines()]
    # Only `messages`: a `prompt` column makes trl take the rows for prompt/completion data.
    dataset = Dataset.from_list([{"messages": row["messages"]} for row in rows])
    config = SFTConfig(
        output_dir=str(work / f"trl-{prepared.name}-{round_number}"),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        learning_rate=1e-3,
        max_length=MAX_LENGTH,
        assistant_only_loss=True,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=10,
        disable_tqdm=True,
    )
    lora = LoraConfig(r=int(LORA["lora_r"]), lora_alpha=int(LORA["lora_alpha"]), lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
    trainer = SFTTrainer(model=str(base), args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora)  # fmt: skip
    started = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - started
    # The same examples in the same order as ours (both shuffle with seed 42): count their tokens.
    examples, _ = tokenize_conversations(prepared / TRAIN_FILE, tokenizer, MAX_LENGTH)
    order = list(trainer.get_train_dataloader().batch_sampler or [])
    consumed = [i for batch in order for i in batch][: steps * BATCH]
    return sum(len(examples[i].input_ids) for i in consumed if i < len(examples)) / seconds


def _prepare(work: Path, name: str, rows: int, answer_sentences: int) -> Path:
    sample = write_sample(work / f"{name}.jsonl", rows, seed=7, answer_sentences=answer_sentences)
    with sample.open("rb") as data:
        prepare_dataset(file_chunks(data), work / name, InputInfo(sample.name), DatasetSettings())
    return work / name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rows", type=int, default=400)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"ours": [], "trl": [], "ours_packed_short": [], "trl_short": []}
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        chats = _prepare(work, "chats", args.rows, answer_sentences=4)
        short = _prepare(work, "short", args.rows, answer_sentences=1)
        build_tiny_phi3(work / "models" / TINY_PHI3)
        for round_number in range(args.rounds):
            results["trl"].append(trl_baseline(work, chats, args.steps, round_number))
            results["ours"].append(ours(work, chats, args.steps, round_number))
            results["trl_short"].append(trl_baseline(work, short, args.steps, round_number))
            results["ours_packed_short"].append(ours(work, short, args.steps, round_number, packing=True))
    median = {name: statistics.median(values) for name, values in results.items()}
    ratios = {
        "ours_to_trl": round(median["ours"] / median["trl"], 2),
        "ours_packed_to_trl_on_short_conversations": round(median["ours_packed_short"] / median["trl_short"], 2),
    }
    goals = {"ours >= 1.0x trl": ratios["ours_to_trl"] >= 1.0,
             "packed >= 1.5x trl on short": ratios["ours_packed_to_trl_on_short_conversations"] >= 1.5}  # fmt: skip
    print(json.dumps({
        "tokens_per_second": {name: [round(v) for v in values] for name, values in results.items()},
        **ratios,
        "goals_met": goals,
        "settings": {"steps": args.steps, "batch": BATCH, "max_length": MAX_LENGTH, **LORA, "device": "cpu"},
    }, indent=2))  # fmt: skip
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
