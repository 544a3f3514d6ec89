"""Loading a registered model for serving: an MLflow `transformers` model folder, merged
(`model/` holds the fine-tuned weights) or adapter-only (`merge_lora_weights=false`: `peft/` holds
the LoRA adapter, `model/` the base it was trained on). Adapter-only models of one base share a
process: the base is loaded once and each model is an adapter on it, named after its endpoint."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from shared.backends.local.tiny_model import END_OF_TURN


@dataclass
class LoadedModel:
    model: Any  # a transformers causal LM, or a PeftModel holding one adapter per endpoint
    tokenizer: Any
    device: str
    stop_ids: list[int]


def is_adapter(model_folder: Path) -> bool:
    return (model_folder / "peft" / "adapter_config.json").exists()


def base_identity(model_folder: Path) -> str:
    """What adapter-only models that may share a process have in common: the base model they were
    trained from (MLflow's `source_model_name`) and its architecture (`model/config.json`)."""
    flavor = yaml.safe_load((model_folder / "MLmodel").read_text())["flavors"]["transformers"]
    digest = hashlib.sha256(str(flavor.get("source_model_name", model_folder)).encode())
    digest.update((model_folder / "model" / "config.json").read_bytes())
    return digest.hexdigest()[:16]


def load(model_folder: Path) -> LoadedModel:
    """The model of `model_folder` without any adapter (for adapter-only models: the base)."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder / "components" / "tokenizer")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = _base_weights(model_folder, dtype) if is_adapter(model_folder) else _merged(model_folder, dtype)
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    stop_ids = [i for i in (end, tokenizer.eos_token_id) if isinstance(i, int) and i >= 0]
    return LoadedModel(model.to(device).eval(), tokenizer, device, stop_ids)


def _merged(model_folder: Path, dtype: Any) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_folder / "model", dtype=dtype)


def _base_weights(model_folder: Path, dtype: Any) -> Any:
    """MLflow saves an adapter-only model's `model/` with the LoRA layers still in it
    (`q_proj.base_layer.weight`, `q_proj.lora_A.default.weight`); loaded as it is, every
    LoRA-wrapped layer would be missing and initialised at random. The base is those weights
    under their own names, without the LoRA ones (which `peft/` holds)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    weights: dict[str, Any] = {}
    for shard in sorted((model_folder / "model").glob("*.safetensors")):
        for name, tensor in load_file(shard).items():
            if ".lora_" not in name:
                weights[name.replace(".base_layer.", ".")] = tensor
    config = AutoConfig.from_pretrained(model_folder / "model")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or []) if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"{model_folder}: base weights do not fit the model: missing {missing}, extra {unexpected}")
    if tied:
        model.tie_weights()
    return model


def add_adapter(loaded: LoadedModel, name: str, model_folder: Path) -> None:
    """Load `model_folder`'s adapter as `name` (the first one turns the base into a PeftModel)."""
    from peft import PeftModel

    if isinstance(loaded.model, PeftModel):
        loaded.model.load_adapter(str(model_folder / "peft"), adapter_name=name)
    else:
        loaded.model = PeftModel.from_pretrained(loaded.model, str(model_folder / "peft"), adapter_name=name)
    loaded.model.eval()


def remove_adapter(loaded: LoadedModel, name: str) -> None:
    loaded.model.delete_adapter(name)
