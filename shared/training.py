"""The fine-tuning parameters: one documented, typed dataclass (as trl's `SFTConfig`) that holds
every name, meaning, default and check. Names are the Azure ML `chat_completion_pipeline`
component's inputs, so the azureml backend passes them on as they are (its schema checks the
types the component takes); the local trainer reads them as its Trainer's arguments. An upload
overrides any of them in its blob metadata, the command line with `--set name=value`; a bad key
or value is refused, naming it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from shared.validation import Rule, checked, flag, one_of

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def _at_least(minimum: int) -> Rule:
    return Rule(f"a whole number, at least {minimum}", checked(int, lambda value: value >= minimum))


def _unlimited_or(minimum: int, unlimited: str) -> Rule:
    """-1 meaning no limit (the component's convention), else a whole number of at least `minimum`."""
    return Rule(f"-1 ({unlimited}) or a whole number, at least {minimum}",
                checked(int, lambda value: value == -1 or value >= minimum))  # fmt: skip


_FRACTION = Rule("a number from 0 to 1", checked(float, lambda value: 0.0 <= value <= 1.0))
_POSITIVE = Rule("a number above 0", checked(float, lambda value: value > 0))
_NON_NEGATIVE = Rule("a number, at least 0", checked(float, lambda value: value >= 0))
_FLAG = Rule("true or false", flag)


def _parameter(default: Any, rule: Rule, help: str) -> Any:
    return field(default=default, metadata={"rule": rule, "help": help})


@dataclass(frozen=True)
class TrainingParameters:
    """Defaults: the walkthrough's where it sets one, else the component's."""

    num_train_epochs: int = _parameter(3, _at_least(1), "passes over the training data")
    max_steps: int = _parameter(-1, _unlimited_or(1, "no limit"), "stop after this many optimizer steps")
    per_device_train_batch_size: int = _parameter(1, _at_least(1), "conversations per device and step")
    per_device_eval_batch_size: int = _parameter(1, _at_least(1), "conversations per device when evaluating")
    gradient_accumulation_steps: int = _parameter(1, _at_least(1), "batches summed into one optimizer step")
    learning_rate: float = _parameter(5e-6, _POSITIVE, "the peak learning rate")
    lr_scheduler_type: str = _parameter(
        "cosine", Rule("one of " + ", ".join(SCHEDULERS), one_of(SCHEDULERS, fold_case=False)), "how it decays"
    )
    warmup_steps: int = _parameter(0, _at_least(0), "steps of linear warm-up")
    weight_decay: float = _parameter(0.0, _NON_NEGATIVE, "AdamW weight decay")
    max_seq_length: int = _parameter(
        -1, _unlimited_or(16, "the model's limit"), "tokens per conversation; longer ones are cut"
    )
    apply_lora: bool = _parameter(True, _FLAG, "train LoRA adapters instead of every weight")
    lora_r: int = _parameter(8, _at_least(1), "LoRA rank")
    lora_alpha: int = _parameter(128, _at_least(1), "LoRA scaling")
    lora_dropout: float = _parameter(0.0, _FRACTION, "dropout on the LoRA layers")
    merge_lora_weights: bool = _parameter(True, _FLAG, "merge the adapters into the model (false: adapter-only)")
    precision: str = _parameter(
        "32", Rule("16, 32 or bf16", one_of(("16", "32", "bf16"))), "training precision (bits, or bf16)"
    )
    seed: int = _parameter(42, _at_least(0), "the random seed (shuffling, initialisation)")
    save_total_limit: int = _parameter(-1, _unlimited_or(1, "keep all"), "checkpoints kept")
    resume_from_checkpoint: bool = _parameter(True, _FLAG, "a restarted job resumes from its last checkpoint")
    # The local trainer's own: short conversations packed into max_seq_length rows (no padding;
    # each conversation attends only to itself, as in trl's bfd packing). The Azure ML component
    # has no such input, so the azureml backend refuses it.
    packing: bool = _parameter(False, _FLAG, "local trainer only: pack short conversations into full rows")


# Every parameter's check, by name.
PARAMETERS: Mapping[str, Rule] = {
    parameter.name: parameter.metadata["rule"] for parameter in fields(TrainingParameters)
}
DEFAULTS: Mapping[str, Any] = asdict(TrainingParameters())


class ParameterError(ValueError):
    """A training parameter override is unknown or malformed; the message names the key."""


def parse_parameter(name: str, value: str) -> Any:
    """One override, from text (blob metadata, `--set`), checked against its rule."""
    rule = PARAMETERS.get(name)
    if rule is None:
        raise ParameterError(f"unknown training parameter {name!r}: known ones are {', '.join(PARAMETERS)}")
    try:
        return rule.parse(value.strip())
    except ValueError:
        raise ParameterError(f"training parameter {name}={value!r}: expected {rule.expects}") from None


def resolve_parameters(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The defaults with already-parsed overrides applied."""
    return asdict(replace(TrainingParameters(), **overrides))
