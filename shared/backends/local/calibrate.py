"""How fast this machine trains a base model: a few LoRA training steps on random tokens, timed,
the way the trainer would run them (same model, device, precision and LoRA targets). Measured once
per base model and device, kept in `<data dir>/calibration.json`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from shared.backends.local.processes import file_lock, write_json
from shared.training import resolve_parameters

CALIBRATION_FILE = "calibration.json"
_ROWS, _LENGTH, _STEPS = 4, 256, 3


def training_rate(data_dir: Path, base_model: str, parameters: dict[str, Any]) -> tuple[float, str]:
    """(training tokens per second, device) for `base_model` (a folder) with `parameters`."""
    import torch

    resolved = resolve_parameters(parameters)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    key = f"{base_model}|{device}|lora={resolved['apply_lora']}|r={resolved['lora_r']}"
    store = data_dir / CALIBRATION_FILE
    with file_lock(data_dir / (CALIBRATION_FILE + ".lock")):  # one measurement at a time: two slow each other
        known = json.loads(store.read_text()) if store.exists() else {}
        if key not in known:
            known[key] = {"tokens_per_second": _measure(base_model, device, resolved), "measured_at": time.time()}
            write_json(store, known)
    return float(known[key]["tokens_per_second"]), device


def _measure(base_model: str, device: str, parameters: dict[str, Any]) -> float:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    bf16 = device == "cuda" and torch.cuda.is_bf16_supported() and parameters.get("precision", "bf16") != "32"
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.bfloat16 if bf16 else torch.float32)
    if parameters["apply_lora"]:
        lora = LoraConfig(r=parameters["lora_r"], lora_alpha=parameters["lora_alpha"], target_modules="all-linear",
                          task_type="CAUSAL_LM")  # fmt: skip
        model = get_peft_model(model, lora)  # type: ignore[assignment]
    model = model.to(device).train()  # type: ignore[arg-type]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, model.config.vocab_size, (_ROWS, _LENGTH), generator=generator).to(device)

    def step() -> None:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # the first step pays for allocation and kernel selection
    started = time.perf_counter()
    for _ in range(_STEPS):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return _ROWS * _LENGTH * _STEPS / (time.perf_counter() - started)
