"""The local trainer process: `python -m shared.backends.local.trainer JOB_DIR`.

LoRA supervised fine-tuning of a causal chat model with transformers + peft: the Phi-3 chat
template, loss on assistant tokens only, checkpoints every epoch (a restarted job resumes from
the last one), metrics to MLflow, and an MLflow model folder as output. It writes only the job's
final status; the backend reads everything else from the files it leaves."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.backends.local.jobs import PROGRESS_FILE, JobRecord, JobSpec, publish_once, read_spec, write_state
from shared.backends.local.processes import file_lock, write_json
from shared.backends.local.settings import TINY_PHI3
from shared.backends.local.tiny_model import build_tiny_phi3
from shared.training import resolve_parameters
from shared.vocabulary import TEST_FILE, TRAIN_FILE, JobStatus

log = logging.getLogger("trainer")
MODEL_FOLDER = "mlflow_model_folder"
DEFAULT_MAX_LENGTH = 2048
LOSS_CURVE_POINTS = 50
SUMMARY_METRICS = ("train_loss", "eval_loss", "perplexity", "tokens_per_second")
PIP_REQUIREMENTS = ["torch", "transformers", "peft", "accelerate", "tokenizers"]


class Canceled(Exception):
    pass


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None  # set on packed rows: positions restart per conversation


def pack(examples: list[Example], max_length: int, seed: int) -> list[Example]:
    """Pack conversations into rows of at most `max_length` tokens, best fit decreasing (trl's
    "bfd"): longest first, each into the row it leaves the least room in, so rows come out nearly
    full and a step computes on little padding (the trainer shuffles the rows). Each conversation
    keeps its own labels and positions, and attends only to itself: the collator passes the
    positions without an attention mask, from which transformers builds a mask of one causal block
    per conversation (as trl's padding-free does)."""
    import bisect
    import random

    order = list(examples)
    random.Random(seed).shuffle(order)  # conversations of one length in a seeded order
    order.sort(key=lambda example: len(example.input_ids), reverse=True)
    members: list[list[Example]] = []
    free: list[tuple[int, int]] = []  # (room left, row), in order
    for example in order:
        size = len(example.input_ids)
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = max_length, len(members)
            members.append([])
        members[row].append(example)
        if room > size:
            bisect.insort(free, (room - size, row))
    rows: list[Example] = []
    for row_members in members:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for example in row_members:
            ids.extend(example.input_ids)
            labels.extend([-100, *example.labels[1:]])  # the previous conversation's last token predicts nothing
            positions.extend(range(len(example.input_ids)))
        rows.append(Example(ids, labels, positions))
    return rows


def resolve_base_model(name: str, models_dir: Path) -> str:
    """A Hugging Face id or local folder as given; the built-in `tiny-phi3` is built on first use."""
    if name == TINY_PHI3:
        return str(build_tiny_phi3(models_dir / TINY_PHI3))
    return name


def tokenize_conversations(path: Path, tokenizer: Any, max_length: int) -> tuple[list[Example], int]:
    """Chat-template each conversation (only `messages`: trl and others trip over `prompt`),
    labelling assistant tokens only. Returns the examples and how many were dropped because
    truncation left no assistant token to learn from."""
    examples, dropped = [], 0
    with path.open("rb") as rows:
        for line in rows:
            messages = json.loads(line)["messages"]
            encoded = tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            ids = list(encoded["input_ids"])[:max_length]
            mask = list(encoded["assistant_masks"])[:max_length]
            if not any(mask):
                dropped += 1
                continue
            examples.append(Example(ids, [t if m else -100 for t, m in zip(ids, mask, strict=True)]))
    return examples, dropped


class _Collator:
    """Pads a batch and counts the real tokens it carries (for tokens per second). Packed rows go
    without an attention mask: transformers then reads where each conversation starts from the
    positions (which restart at 0; so do the padding's) and keeps conversations from attending to
    each other; with a mask, it would take each row for one sequence. Padding is on the right, so a
    causal mask keeps real tokens from seeing it."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id
        self.tokens = 0

    def __call__(self, batch: list[Example]) -> dict[str, Any]:
        import torch

        width = max(len(e.input_ids) for e in batch)
        self.tokens += sum(len(e.input_ids) for e in batch)
        tensors: dict[str, Any] = {
            "input_ids": torch.tensor([e.input_ids + [self.pad_id] * (width - len(e.input_ids)) for e in batch]),
            "labels": torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in batch]),
            # No key/value cache in training: the model would build one, and with one it skips the
            # per-conversation mask that packed rows need.
            "use_cache": False,
        }
        if all(e.position_ids is not None for e in batch):
            tensors["position_ids"] = torch.tensor(
                [(e.position_ids or []) + list(range(width - len(e.input_ids))) for e in batch]
            )
        else:
            tensors["attention_mask"] = torch.tensor(
                [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in batch]
            )
        return tensors


def _experiment(spec: JobSpec) -> None:
    """The job's MLflow experiment: its artifacts under the local data folder (not `./mlruns` of
    whatever folder a command ran in), and shown in MLflow's UI as model training, not GenAI."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if mlflow.get_experiment_by_name(spec.experiment_name) is None:
        artifacts = Path(spec.models_dir).parent / "mlartifacts"
        with contextlib.suppress(MlflowException):  # a concurrent job created it first
            mlflow.create_experiment(spec.experiment_name, artifact_location=artifacts.as_uri())
    mlflow.set_experiment(spec.experiment_name)
    mlflow.set_experiment_tag("mlflow.experimentKind", "custom_model_development")


def _metrics_callback(collator: _Collator, directory: Path) -> Any:
    """Metrics to MLflow at each logging step, and the job's progress to `progress.json` (steps
    done and to do, loss, tokens per second, an ETA) for `train --wait`, the demo and `jobs`."""
    import mlflow
    from transformers import TrainerCallback

    class MetricsToMlflow(TrainerCallback):
        def __init__(self) -> None:
            self.started = self.last_time = time.monotonic()
            self.last_tokens = 0
            self.first_step: int | None = None  # a resumed job starts past 0

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **_: Any) -> None:
            logs = logs or {}
            metrics = {}
            if "loss" in logs:
                now = time.monotonic()
                metrics["train_loss"] = logs["loss"]
                metrics["tokens_per_second"] = (collator.tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
                self.last_time, self.last_tokens = now, collator.tokens
            if "learning_rate" in logs:
                metrics["learning_rate"] = logs["learning_rate"]
            if "eval_loss" in logs:
                metrics["eval_loss"] = logs["eval_loss"]
                metrics["perplexity"] = math.exp(min(logs["eval_loss"], 50))
            if metrics:
                mlflow.log_metrics(metrics, step=state.global_step)
            if "train_loss" in metrics:
                self._progress(state, metrics)

        def _progress(self, state: Any, metrics: dict[str, float]) -> None:
            if self.first_step is None:
                self.first_step = max(0, state.global_step - state.logging_steps)
            done = state.global_step - self.first_step
            left = state.max_steps - state.global_step
            elapsed = time.monotonic() - self.started
            write_json(directory / PROGRESS_FILE, {
                "step": state.global_step, "total_steps": state.max_steps, "loss": metrics["train_loss"],
                "tokens_per_second": metrics["tokens_per_second"],
                "eta_s": elapsed / done * left if done > 0 else None,
            })  # fmt: skip

    return MetricsToMlflow()


def _loss_curve(history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        points = [(entry["step"], entry[key]) for entry in history if key in entry]
        if points:
            axes.plot(*zip(*points, strict=True), marker="o" if key == "eval_loss" else None, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _last_checkpoint(checkpoints: Path) -> str | None:
    """The newest complete checkpoint: a trainer killed while saving leaves one without its
    trainer_state.json (written last), which cannot be resumed from."""
    found = sorted(checkpoints.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    return str(found[-1].parent) if found else None


def train(directory: Path, spec: JobSpec) -> dict[str, Any]:
    import mlflow
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed

    parameters = resolve_parameters(spec.parameters)
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported() and spec.parameters.get("precision", "bf16") != "32"
    base = resolve_base_model(spec.base_model, Path(spec.models_dir))
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16 if bf16 else torch.float32)
    requested = parameters["max_seq_length"]
    max_length = requested if requested > 0 else min(tokenizer.model_max_length, DEFAULT_MAX_LENGTH)
    train_set, dropped = tokenize_conversations(directory / "inputs" / TRAIN_FILE, tokenizer, max_length)
    eval_set, _ = tokenize_conversations(directory / "inputs" / TEST_FILE, tokenizer, max_length)
    if not train_set:
        raise ValueError(f"no training conversation keeps an assistant token within max_seq_length={max_length}")
    if parameters["packing"]:
        train_set = pack(train_set, max_length, parameters["seed"])
    if parameters["apply_lora"]:
        set_seed(parameters["seed"])  # the adapters' initial weights, as trl seeds them: a rerun trains the same
        lora = LoraConfig(
            r=parameters["lora_r"],
            lora_alpha=parameters["lora_alpha"],
            lora_dropout=parameters["lora_dropout"],
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)  # type: ignore[assignment]  # a PeftModel wraps the model

    collator = _Collator(tokenizer.pad_token_id)
    per_epoch = -(
        -len(train_set) // (parameters["per_device_train_batch_size"] * parameters["gradient_accumulation_steps"])
    )
    total_steps = parameters["max_steps"] if parameters["max_steps"] > 0 else per_epoch * parameters["num_train_epochs"]
    checkpoints = directory / "checkpoints"
    args = TrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=parameters["num_train_epochs"],
        max_steps=parameters["max_steps"],
        per_device_train_batch_size=parameters["per_device_train_batch_size"],
        per_device_eval_batch_size=parameters["per_device_eval_batch_size"],
        gradient_accumulation_steps=parameters["gradient_accumulation_steps"],
        learning_rate=parameters["learning_rate"],
        lr_scheduler_type=parameters["lr_scheduler_type"],
        warmup_steps=parameters["warmup_steps"],
        weight_decay=parameters["weight_decay"],
        seed=parameters["seed"],
        save_strategy="epoch",
        eval_strategy="epoch" if eval_set else "no",
        save_total_limit=None if parameters["save_total_limit"] < 1 else parameters["save_total_limit"],
        logging_steps=max(1, total_steps // LOSS_CURVE_POINTS),  # a curve, without a write per step
        report_to=[],
        use_cpu=not cuda,
        bf16=bf16,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set or None,
        data_collator=collator,
        callbacks=[_metrics_callback(collator, directory)],
    )

    mlflow.set_tracking_uri(spec.tracking_uri)
    # The first touch of a new store creates its tables; two jobs starting at once on a fresh
    # data folder raced there ("duplicate column name: step"): one at a time.
    with file_lock(Path(spec.models_dir).parent / "mlflow.lock"):
        _experiment(spec)
    run_file = directory / "mlflow_run_id"
    run_id = run_file.read_text().strip() if run_file.exists() else None
    resume = _last_checkpoint(checkpoints) if parameters["resume_from_checkpoint"] else None
    with mlflow.start_run(run_id=run_id, run_name=spec.job_name, tags={"job": spec.job_name, **spec.tags}) as run:
        run_file.write_text(run.info.run_id)
        if run_id is None:
            mlflow.log_params({**parameters, "base_model": spec.base_model, "max_length": max_length})
        if resume:
            log.info("resuming %s from %s", spec.job_name, resume)
        started, tokens_before = time.monotonic(), collator.tokens
        result = trainer.train(resume_from_checkpoint=resume)
        seconds = time.monotonic() - started
        evaluation = trainer.evaluate() if eval_set else {}

        final = (
            trainer.model.merge_and_unload()  # type: ignore[union-attr,operator]  # a PeftModel here
            if parameters["apply_lora"] and parameters["merge_lora_weights"]
            else trainer.model
        )
        output = directory / "outputs" / MODEL_FOLDER
        if output.exists():
            shutil.rmtree(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        mlflow.transformers.save_model(
            transformers_model={"model": final, "tokenizer": tokenizer},
            path=str(output),
            task="llm/v1/chat",
            pip_requirements=PIP_REQUIREMENTS,
        )
        _loss_curve(trainer.state.log_history, directory / "loss_curve.png", f"{spec.job_name} ({spec.base_model})")
        mlflow.log_artifact(str(directory / "loss_curve.png"))
        eval_loss = evaluation.get("eval_loss")
        metrics = {
            "train_loss": result.training_loss,
            "eval_loss": eval_loss,
            "perplexity": math.exp(min(eval_loss, 50)) if eval_loss is not None else None,
            "tokens_per_second": (collator.tokens - tokens_before) / max(seconds, 1e-9),
            "steps": trainer.state.global_step,
            "epochs": trainer.state.epoch,
            "train_examples": len(train_set),
            "eval_examples": len(eval_set),
            "dropped_examples": dropped,
            "resumed_from": resume,
            "device": "cuda" if cuda else "cpu",
            "precision": "bf16" if bf16 else "fp32",
            "lora": parameters["apply_lora"],
            "merged": parameters["apply_lora"] and parameters["merge_lora_weights"],
            "mlflow_run_id": run.info.run_id,
            "model_folder": str(output),
            "loss_curve": str(directory / "loss_curve.png"),
        }
        # The summary, at the last step: what the MLflow UI shows as latest is what metrics.json says.
        summary = {name: metrics[name] for name in SUMMARY_METRICS if metrics[name] is not None}
        mlflow.log_metrics(summary, step=trainer.state.global_step)
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or "no message"
    return f"{type(error).__name__}: {text}"[:500]


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    directory = Path(argv[0]).resolve()
    spec = read_spec(directory)

    def cancel(signum: int, frame: Any) -> None:
        raise Canceled

    signal.signal(signal.SIGTERM, cancel)
    started = datetime.now(UTC).isoformat()
    try:
        metrics = train(directory, spec)
        state = JobRecord(
            spec.job_name, JobStatus.COMPLETED, started_at=started, ended_at=datetime.now(UTC).isoformat()
        )
        log.info("job %s completed: %s", spec.job_name, json.dumps(metrics))
    except Canceled:
        state = JobRecord(spec.job_name, JobStatus.CANCELED, "canceled on request", started_at=started,
                         ended_at=datetime.now(UTC).isoformat())  # fmt: skip
    except Exception as error:
        traceback.print_exc()
        state = JobRecord(spec.job_name, JobStatus.FAILED, _one_line(error), started_at=started,
                         ended_at=datetime.now(UTC).isoformat())  # fmt: skip
    write_state(directory, state)
    publish_once(directory, state)
    return 0 if state.status == JobStatus.COMPLETED else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
