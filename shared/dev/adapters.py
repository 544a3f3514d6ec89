"""Adapter-only models made in a second, for serving tests and benchmarks: tiny-phi3 with a LoRA
adapter whose weights are random (seeded), saved by MLflow exactly as the trainer saves a model
trained with `merge_lora_weights=false`. Different seeds answer differently, as different
fine-tunes of one base do; no training is needed to tell them apart."""

from __future__ import annotations

from pathlib import Path

LORA_TARGETS = ["qkv_proj", "o_proj"]


def random_adapter_model(base: Path, target: Path, seed: int) -> Path:
    """An MLflow model folder at `target` (made once): `base` plus a seeded random LoRA adapter."""
    if (target / "MLmodel").exists():
        return target
    import mlflow.transformers
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"),
    )
    generator = torch.Generator().manual_seed(seed)
    for name, weight in model.named_parameters():
        if "lora_B" in name:  # zero at initialisation, which would make every adapter the base
            weight.data.normal_(0.0, 0.5, generator=generator)
    mlflow.transformers.save_model(
        transformers_model={"model": model, "tokenizer": AutoTokenizer.from_pretrained(base)},
        path=str(target),
        task="llm/v1/chat",
        pip_requirements=["torch", "transformers", "peft"],
    )
    return target
