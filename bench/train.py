"""Training throughput and loss: our local trainer against trl's SFTTrainer configured as well as
it goes on CPU, same tiny model, same data, same LoRA, batch, learning rate, schedule and maximum
length, in the same process, alternating runs.

trl runs with assistant-only loss (the tiny model's chat template carries `{% generation %}`
markers, so trl masks exactly the tokens ours does), without gradient checkpointing, in fp32 as
ours on CPU, and in each of: padded batches; padding-free (the batch flattened into one row, each
conversation its own block of attention through per-conversation position_ids); bfd packing (which
trl always runs padding-free); wrapped packing (rows cut at max_length, conversations split and
attending to each other: reported, but not counted as trl's best). Ours runs with packing off and
on. Tokens per second count real (not padding) tokens; loss is the mean training loss over the last
steps (assistant tokens only). Goals: ours (its faster mode) at least 1.0x trl's best; ours' loss
no worse than trl's in the matching mode by more than noise.
Usage: .venv/bin/python bench/train.py [--steps 30] [--rounds 2] [--data chats,short]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

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
LEARNING_RATE = 1e-3
SCHEDULER = "cosine"  # our trainer's default
SEED = 42
LOSS_NOISE = 0.05  # ours' loss may exceed trl's in the matching mode by this fraction
DATA = {"chats": 4, "short": 1}  # data set: sentences per answer at most

# trl's configurations: SFTConfig settings on top of the shared ones.
TRL: dict[str, dict[str, Any]] = {
    "trl_padded": {},
    # trl refuses max_length without packing here; no conversation is longer (checked in main).
    "trl_padding_free": {"padding_free": True, "max_length": None},
    "trl_packed_bfd": {"packing": True, "packing_strategy": "bfd"},  # runs padding-free whatever padding_free says
    "trl_packed_wrapped": {"packing": True, "packing_strategy": "wrapped"},
}
# Configurations that keep each conversation whole and apart: the ones trl's best is taken from.
APART = ("trl_padded", "trl_padding_free", "trl_packed_bfd")
# Ours, and the trl configuration it is compared with for loss (same batches: same data per step).
MATCHING = {"ours": "trl_padded", "ours_packed": "trl_packed_bfd"}


class Run(NamedTuple):
    tokens_per_second: float
    loss: float  # mean training loss over the last `loss_steps` steps


def _tail_mean(losses: list[float], loss_steps: int) -> float:
    return statistics.fmean(losses[-loss_steps:])


def ours(work: Path, prepared: Path, steps: int, round_number: int, loss_steps: int, packing: bool = False) -> Run:
    import mlflow

    job = work / f"ours-{prepared.name}-{round_number}-{packing}"
    (job / "inputs").mkdir(parents=True)
    (job / "inputs" / TRAIN_FILE).write_bytes((prepared / TRAIN_FILE).read_bytes())
    (job / "inputs" / TEST_FILE).write_text("")  # measure training only, as for trl
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    spec = JobSpec(
        job_name=job.name,
        base_model=TINY_PHI3,
        parameters={
            "max_steps": steps,
            "per_device_train_batch_size": BATCH,
            "learning_rate": LEARNING_RATE,
            "lr_scheduler_type": SCHEDULER,
            "max_seq_length": MAX_LENGTH,
            "seed": SEED,
            "packing": packing,
            **LORA,
        },
        experiment_name="bench",
        tracking_uri=tracking_uri,
        models_dir=str(work / "models"),
    )
    metrics = train(job, spec)
    # Our trainer logs each step's loss (a curve of at most 50 points: every step here), then the
    # run's mean at the last step: keep each step's first value.
    history = mlflow.MlflowClient(tracking_uri).get_metric_history(metrics["mlflow_run_id"], "train_loss")
    per_step: dict[int, float] = {}
    for point in sorted(history, key=lambda p: (p.step, p.timestamp)):
        per_step.setdefault(point.step, point.value)
    losses = [per_step[step] for step in sorted(per_step)]
    return Run(metrics["tokens_per_second"], _tail_mean(losses, loss_steps))


class _Counting:
    """trl's collator, counting the real tokens of the examples it collates."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator
        self.tokens = 0

    def __call__(self, examples: list[dict[str, Any]]) -> Any:
        self.tokens += sum(len(example["input_ids"]) for example in examples)
        return self.collator(examples)


def trl_run(
    work: Path, prepared: Path, steps: int, round_number: int, loss_steps: int, name: str, settings: dict[str, Any]
) -> Run:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    base = build_tiny_phi3(work / "models" / TINY_PHI3)
    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = [json.loads(line) for line in (prepared / TRAIN_FILE).read_text().splitlines()]
    # Only `messages`: a `prompt` column makes trl take the rows for prompt/completion data.
    dataset = Dataset.from_list([{"messages": row["messages"]} for row in rows])
    config = SFTConfig(**{
        "output_dir": str(work / f"{name}-{prepared.name}-{round_number}"),
        "max_steps": steps,
        "per_device_train_batch_size": BATCH,
        "learning_rate": LEARNING_RATE,
        "lr_scheduler_type": SCHEDULER,
        "max_length": MAX_LENGTH,
        "seed": SEED,
        "assistant_only_loss": True,
        "gradient_checkpointing": False,  # trl's default is on: memory is no concern here
        "bf16": False,  # trl's default is on: ours trains in fp32 on CPU
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        **settings,
    })  # fmt: skip
    lora = LoraConfig(r=int(LORA["lora_r"]), lora_alpha=int(LORA["lora_alpha"]), lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
    trainer = SFTTrainer(model=str(base), args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora)  # fmt: skip
    counting = _Counting(trainer.data_collator)
    trainer.data_collator = counting
    started = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return Run(counting.tokens / seconds, _tail_mean(losses, loss_steps))


def _prepare(work: Path, name: str, rows: int, answer_sentences: int) -> Path:
    sample = write_sample(work / f"{name}.jsonl", rows, seed=7, answer_sentences=answer_sentences)
    with sample.open("rb") as data:
        prepare_dataset(file_chunks(data), work / name, InputInfo(sample.name), DatasetSettings())
    return work / name


def _longest(prepared: Path, base: Path) -> int:
    from transformers import AutoTokenizer

    examples, _ = tokenize_conversations(prepared / TRAIN_FILE, AutoTokenizer.from_pretrained(base), 10**9)
    return max(len(example.input_ids) for example in examples)


def _summary(runs: dict[str, list[Run]]) -> dict[str, Any]:
    speed = {name: statistics.median(run.tokens_per_second for run in values) for name, values in runs.items()}
    loss = {name: statistics.median(run.loss for run in values) for name, values in runs.items()}
    ours_best = max(("ours", "ours_packed"), key=speed.__getitem__)
    trl_best = max(APART, key=speed.__getitem__)
    ratio = round(speed[ours_best] / speed[trl_best], 2)
    loss_ratios = {f"{mine}_to_{theirs}": round(loss[mine] / loss[theirs], 3) for mine, theirs in MATCHING.items()}
    return {
        "tokens_per_second": {name: [round(run.tokens_per_second) for run in values] for name, values in runs.items()},
        "loss_after_n_steps": {name: [round(run.loss, 3) for run in values] for name, values in runs.items()},
        "ours_best": ours_best,
        "trl_best": trl_best,
        "ours_best_to_trl_best": ratio,
        "each_to_trl_best": {name: round(value / speed[trl_best], 2) for name, value in speed.items()},
        "loss_ours_to_trl_matching": loss_ratios,
        "goals_met": {
            "ours >= 1.0x trl's best (tokens/s)": ratio >= 1.0,
            f"ours' loss <= trl's matching x{1 + LOSS_NOISE}": all(
                value <= 1 + LOSS_NOISE for value in loss_ratios.values()
            ),
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--loss-steps", type=int, default=10, help="the loss is the mean over this many last steps")
    parser.add_argument("--data", default=",".join(DATA), help=f"comma-separated, of: {', '.join(DATA)}")
    parser.add_argument("--trl", default=",".join(TRL), help=f"comma-separated, of: {', '.join(TRL)}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady timings on shared cores)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    names, configurations = args.data.split(","), {name: TRL[name] for name in args.trl.split(",")}
    if not set(APART) <= set(configurations):
        parser.error(f"--trl needs at least {', '.join(APART)}: trl's best is taken from them")
    results: dict[str, dict[str, list[Run]]] = {
        name: {key: [] for key in ("ours", "ours_packed", *configurations)} for name in names
    }
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        base = build_tiny_phi3(work / "models" / TINY_PHI3)
        prepared = {name: _prepare(work, name, args.rows, answer_sentences=DATA[name]) for name in names}
        for name, folder in prepared.items():
            if (longest := _longest(folder, base)) > MAX_LENGTH:
                sys.exit(f"{name}: a conversation of {longest} tokens; trl's padding-free would not cut it")
        # A few steps of each first, unrecorded: a process's first training pays one-off costs.
        first = next(iter(prepared.values()))
        trl_run(work, first, 3, -1, 1, "trl_padded", TRL["trl_padded"])
        ours(work, first, 3, -1, 1)
        for round_number in range(args.rounds):
            for name, folder in prepared.items():
                runs = results[name]
                for trl_name, settings in configurations.items():
                    runs[trl_name].append(
                        trl_run(work, folder, args.steps, round_number, args.loss_steps, trl_name, settings)
                    )
                    if trl_name == "trl_padded":
                        runs["ours"].append(ours(work, folder, args.steps, round_number, args.loss_steps))
                    if trl_name == "trl_packed_bfd":
                        runs["ours_packed"].append(
                            ours(work, folder, args.steps, round_number, args.loss_steps, packing=True)
                        )
    summaries = {name: _summary(runs) for name, runs in results.items()}
    print(json.dumps({
        **summaries,
        "settings": {"steps": args.steps, "rounds": args.rounds, "loss_steps": args.loss_steps, "batch": BATCH,
                     "max_length": MAX_LENGTH, "learning_rate": LEARNING_RATE, "scheduler": SCHEDULER, **LORA,
                     "device": "cpu", "threads": args.threads, "precision": "fp32", "trl": configurations},
    }, indent=2))  # fmt: skip
    return 0 if all(all(summary["goals_met"].values()) for summary in summaries.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
