"""Our own schema of the `chat_completion_pipeline` component's inputs (registry `azureml`,
0.0.82), so every parameter is checked before any job is sent: the SDK does not check input
names offline, and the service refuses unknown ones only after the job is created."""

from __future__ import annotations

import ast
from collections.abc import Mapping
from typing import Any

from shared.training import DEFAULTS, SCHEDULERS
from shared.validation import flag, whole_number

COMPONENT_NAME = "chat_completion_pipeline"
REGISTRY = "azureml"

_STRINGS = (
    "instance_type_model_import instance_type_preprocess instance_type_finetune instance_type_model_evaluation "
    "shm_size_finetune huggingface_id task_name optim lr_scheduler_type precision evaluation_strategy "
    "logging_strategy metric_for_best_model deepspeed_stage evaluation_config_params compute_model_import "
    "compute_preprocess compute_finetune compute_model_evaluation"
)
_INTEGERS = (
    "num_nodes_finetune number_of_gpu_to_use_finetuning batch_size max_seq_length lora_alpha lora_r "
    "num_train_epochs max_steps per_device_train_batch_size per_device_eval_batch_size warmup_steps "
    "gradient_accumulation_steps eval_accumulation_steps seed dataloader_num_workers eval_steps logging_steps "
    "save_total_limit early_stopping_patience"
)
_NUMBERS = (
    "lora_dropout learning_rate weight_decay adam_beta1 adam_beta2 adam_epsilon max_grad_norm "
    "evaluation_steps_interval early_stopping_threshold"
)
_FLAGS = (
    "trust_remote_code pad_to_max_length apply_lora merge_lora_weights auto_find_batch_size enable_full_determinism "
    "ignore_mismatched_sizes resume_from_checkpoint apply_early_stopping apply_deepspeed apply_ort"
)
_ASSETS = {
    "mlflow_model_path": "mlflow_model",
    "pytorch_model_path": "custom_model",
    "finetune_config_path": "uri_file",
    "train_file_path": "uri_file",
    "validation_file_path": "uri_file",
    "test_file_path": "uri_file",
    "deepspeed": "uri_file",
    "evaluation_config": "uri_file",
    "train_mltable_path": "mltable",
    "validation_mltable_path": "mltable",
    "test_mltable_path": "mltable",
}
INPUT_KINDS: Mapping[str, str] = {
    **dict.fromkeys(_STRINGS.split(), "string"),
    **dict.fromkeys(_INTEGERS.split(), "integer"),
    **dict.fromkeys(_NUMBERS.split(), "number"),
    **dict.fromkeys(_FLAGS.split(), "flag"),
    **_ASSETS,
}
CHOICES: Mapping[str, tuple[str, ...]] = {
    "task_name": ("ChatCompletion",),
    "precision": ("32", "16"),
    "deepspeed_stage": ("2", "3"),
    "lr_scheduler_type": SCHEDULERS,
    "optim": ("adamw_torch", "adafactor"),
}
OUTPUT = "mlflow_model_folder"
# The walkthrough's fine-tune settings (our training defaults where it sets them, and DeepSpeed
# stage 2, which only the component has), the base the model's own defaults and the upload's go on.
# The component's own defaults stand for the rest.
WALKTHROUGH_DEFAULTS: Mapping[str, Any] = {
    **{name: DEFAULTS[name] for name in ("num_train_epochs", "per_device_train_batch_size",
                                         "per_device_eval_batch_size", "learning_rate", "lr_scheduler_type",
                                         "apply_lora")},
    "apply_deepspeed": "true",
    "deepspeed_stage": "2",
}  # fmt: skip


class ComponentInputError(ValueError):
    pass


def component_value(name: str, value: Any) -> Any:
    """`value` as the component takes it (flags as "true"/"false"); raises ComponentInputError."""
    kind = INPUT_KINDS.get(name)
    if kind is None:
        raise ComponentInputError(f"{name!r} is not an input of {COMPONENT_NAME}")
    try:
        if kind == "flag":
            return "true" if flag(value) else "false"
        if kind == "integer":
            return whole_number(value)
        if kind == "number":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
    except (TypeError, ValueError):
        raise ComponentInputError(f"{name}={value!r}: {COMPONENT_NAME} expects a {kind}") from None
    text = str(value)
    if name in CHOICES and text not in CHOICES[name]:
        raise ComponentInputError(f"{name}={value!r}: {COMPONENT_NAME} takes one of {', '.join(CHOICES[name])}")
    return text


def merge_parameters(model_tag: str | None, overrides: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Our defaults, then the model's `model_specific_defaults` tag, then the upload's overrides.
    Unknown keys in the tag are dropped with a warning (it carries non-inputs such as
    learning_rate_min); a bad override raises ComponentInputError naming it."""
    warnings: list[str] = []
    merged = dict(WALKTHROUGH_DEFAULTS)
    tag_defaults: dict[str, Any] = {}
    if model_tag:
        try:
            parsed = ast.literal_eval(model_tag)
            tag_defaults = parsed if isinstance(parsed, dict) else {}
        except (ValueError, SyntaxError):
            warnings.append("the model's model_specific_defaults tag is not a dict literal; ignored")
    for name, value in tag_defaults.items():
        if name not in INPUT_KINDS:
            warnings.append(
                f"model_specific_defaults sets {name!r}, which is not an input of {COMPONENT_NAME}: dropped"
            )
            continue
        try:
            merged[name] = component_value(name, value)
        except ComponentInputError as error:
            warnings.append(f"model_specific_defaults: {error}: dropped")
    if tag_defaults:
        warnings.append(f"the model's own defaults override ours: {sorted(set(tag_defaults) & set(INPUT_KINDS))}")
    for name, value in overrides.items():
        merged[name] = component_value(name, "16" if name == "precision" and value == "bf16" else value)
    return {name: component_value(name, value) for name, value in merged.items()}, warnings
