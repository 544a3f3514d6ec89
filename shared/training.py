"""Fine-tuning parameters: names and meanings of the Azure ML `chat_completion_pipeline`
component's inputs, with the walkthrough's defaults. Both backends take these; per-upload
overrides (blob metadata, `--set key=value`) are checked here, naming any bad key."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def _flag(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered not in ("true", "false"):
        raise ValueError
    return lowered == "true"


def _precision(value: str) -> str:
    if value not in ("16", "32", "bf16"):
        raise ValueError
    return value


def _scheduler(value: str) -> str:
    if value not in SCHEDULERS:
        raise ValueError
    return value


@dataclass(frozen=True)
class Parameter:
    default: Any
    expects: str
    parse: Callable[[str], Any]
    check: Callable[[Any], bool] = lambda value: True


def _int(minimum: int) -> Parameter:
    return Parameter(0, f"a whole number, at least {minimum}", int, lambda value: value >= minimum)


def _unlimited_or(minimum: int, unlimited: str) -> Parameter:
    """-1 meaning no limit (the component's convention), else a whole number of at least `minimum`."""
    return Parameter(
        -1, f"-1 ({unlimited}) or a whole number, at least {minimum}", int, lambda v: v == -1 or v >= minimum
    )


def _with_default(parameter: Parameter, default: Any) -> Parameter:
    return Parameter(default, parameter.expects, parameter.parse, parameter.check)


_FRACTION = Parameter(0.0, "a number from 0 to 1", float, lambda value: 0.0 <= value <= 1.0)
_POSITIVE = Parameter(0.0, "a number above 0", float, lambda value: value > 0)
_NON_NEGATIVE = Parameter(0.0, "a number, at least 0", float, lambda value: value >= 0)
_FLAG = Parameter(False, "true or false", _flag)

# Defaults: the walkthrough's where it sets one, else the component's.
PARAMETERS: Mapping[str, Parameter] = {
    "num_train_epochs": _with_default(_int(1), 3),
    "max_steps": _unlimited_or(1, "no limit"),
    "per_device_train_batch_size": _with_default(_int(1), 1),
    "per_device_eval_batch_size": _with_default(_int(1), 1),
    "gradient_accumulation_steps": _with_default(_int(1), 1),
    "learning_rate": _with_default(_POSITIVE, 5e-6),
    "lr_scheduler_type": Parameter("cosine", "one of " + ", ".join(SCHEDULERS), _scheduler),
    "warmup_steps": _with_default(_int(0), 0),
    "weight_decay": _with_default(_NON_NEGATIVE, 0.0),
    "max_seq_length": _unlimited_or(16, "the model's limit"),
    "apply_lora": _with_default(_FLAG, True),
    "lora_r": _with_default(_int(1), 8),
    "lora_alpha": _with_default(_int(1), 128),
    "lora_dropout": _with_default(_FRACTION, 0.0),
    "merge_lora_weights": _with_default(_FLAG, True),
    "precision": Parameter("32", "16, 32 or bf16", _precision),
    "seed": _with_default(_int(0), 42),
    "save_total_limit": _unlimited_or(1, "keep all"),
    "resume_from_checkpoint": _with_default(_FLAG, True),
    # The local trainer's own: short conversations packed into max_seq_length rows (no padding;
    # attention may cross conversations, as in trl's packing). The Azure ML component has no
    # such input, so the azureml backend refuses it.
    "packing": _with_default(_FLAG, False),
}  # fmt: skip


class ParameterError(ValueError):
    """A training parameter override is unknown or malformed; the message names the key."""


def parse_parameter(name: str, value: str) -> Any:
    """One override, from text (blob metadata, `--set`), checked against the schema."""
    parameter = PARAMETERS.get(name)
    if parameter is None:
        raise ParameterError(f"unknown training parameter {name!r}: known ones are {', '.join(PARAMETERS)}")
    try:
        parsed = parameter.parse(value.strip())
        valid = parameter.check(parsed)
    except ValueError:
        valid = False
    if not valid:
        raise ParameterError(f"training parameter {name}={value!r}: expected {parameter.expects}")
    return parsed


def resolve_parameters(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The defaults with already-parsed overrides applied."""
    return {name: overrides.get(name, parameter.default) for name, parameter in PARAMETERS.items()}
