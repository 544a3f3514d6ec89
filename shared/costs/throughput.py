"""What an estimate of GPU time rests on: model sizes, the GPUs of Azure VM sizes, and published
LoRA fine-tuning throughput. Every figure names its public source; none is measured here."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Parameters, in billions, of the base models the app knows (their model cards). Matched on the
# name without registry prefix or version, case-insensitively.
MODEL_BILLIONS = {
    "phi-4": 14.7,  # huggingface.co/microsoft/phi-4
    "phi-3-medium-4k-instruct": 14.0,  # huggingface.co/microsoft/Phi-3-medium-4k-instruct
    "phi-3-medium-128k-instruct": 14.0,
    "phi-3-mini-4k-instruct": 3.8,  # huggingface.co/microsoft/Phi-3-mini-4k-instruct
    "phi-3-mini-128k-instruct": 3.8,
    "phi-3.5-mini-instruct": 3.8,  # huggingface.co/microsoft/Phi-3.5-mini-instruct
    "phi-4-mini-instruct": 3.8,  # huggingface.co/microsoft/Phi-4-mini-instruct
    "meta-llama-3.1-8b-instruct": 8.0,
    "mistral-7b-instruct-v01": 7.2,
}


@dataclass(frozen=True)
class VmSize:
    gpu: str  # the GPU model, a key of GPU_SPEEDUP
    # Managed online deployments reserve 20% extra quota, except on these sizes ("Skip 20%
    # reservation: Yes" in learn.microsoft.com/azure/machine-learning/reference-managed-online-endpoints-vm-sku-list).
    skips_reservation: bool


# The GPU sizes fine-tuning runs on (vCPUs and quota families come from the workspace's VM size
# API): learn.microsoft.com/azure/virtual-machines/sizes/gpu-accelerated/nca100v4-series,
# .../ndasra100v4-series, .../ndma100v4-series, .../ncadsh100v5-series, .../ndh100v5-series.
VM_SIZES = {
    "standard_nc24ads_a100_v4": VmSize("A100", True),
    "standard_nc48ads_a100_v4": VmSize("A100", True),
    "standard_nc96ads_a100_v4": VmSize("A100", True),
    "standard_nd96asr_v4": VmSize("A100", True),
    "standard_nd96amsr_a100_v4": VmSize("A100", True),
    "standard_nc40ads_h100_v5": VmSize("H100", True),
    "standard_nc80adis_h100_v5": VmSize("H100", True),
    "standard_nd96isr_h100_v5": VmSize("H100", True),
}

# LoRA supervised fine-tuning, training tokens per second per GPU, by model size (billions of
# parameters, the largest model the row covers) on an A100 80GB:
# - 3.2B: 8,210 tokens/s, Llama-3.2-3B LoRA on 1x A100, sequence 4096 packed
#   (github.com/pytorch/torchtune README, "Memory and training speed").
# - 7.7B: about 3,150 tokens/s, Qwen-7B LoRA on 1x A100 80GB, sequence 2048, from 5.2 s per step
#   of 8 sequences (github.com/QwenLM/Qwen README, "Profiling of Memory and Speed").
# - 14.2B: about 1,950 tokens/s, Qwen-14B LoRA, same table (8.4 s per step).
# Larger models scale as 1 / parameters (the three rows above hold 30-35% of the A100's peak at
# 4 x parameters FLOPs per token).
A100_LORA_TOKENS_PER_SECOND = ((3.2, 8210.0), (7.7, 3150.0), (14.2, 1950.0))
# H100 against A100 for the same training: about 2.2x (MosaicML, "Benchmarking Large Language
# Models on NVIDIA H100 GPUs", databricks.com/blog/coreweave-nvidia-h100-part-1).
GPU_SPEEDUP = {"A100": 1.0, "H100": 2.2}
# A full fine-tune computes weight gradients too: about 6 x parameters FLOPs per token against
# LoRA's 4 x parameters.
FULL_FINETUNE_FACTOR = 4 / 6
# Scaling across the GPUs of one node (data parallel) is not perfect; no public figure for
# this pipeline: a conservative allowance.
MULTI_GPU_EFFICIENCY = 0.9


def model_billions(base_model: str) -> float | None:
    """The size of a base model named `registry/name:version`, `name` or a Hugging Face id."""
    name = base_model.rsplit("/", 1)[-1].split(":", 1)[0].lower()
    if name in MODEL_BILLIONS:
        return MODEL_BILLIONS[name]
    found = re.search(r"(\d+(?:\.\d+)?)b\b", name)  # "...-8B-Instruct" says its size
    return float(found.group(1)) if found else None


def vm_size(name: str) -> VmSize | None:
    return VM_SIZES.get(name.lower())


def tokens_per_second(billions: float, gpu: str, gpus: int, lora: bool) -> float | None:
    """Training tokens per second of one node: `gpus` GPUs of kind `gpu` (A100 or H100)."""
    if gpu not in GPU_SPEEDUP:
        return None
    rate = next((rate for size, rate in A100_LORA_TOKENS_PER_SECOND if billions <= size), None)
    if rate is None:
        largest, largest_rate = A100_LORA_TOKENS_PER_SECOND[-1]
        rate = largest_rate * largest / billions
    rate *= GPU_SPEEDUP[gpu] * (1.0 if lora else FULL_FINETUNE_FACTOR)
    return rate * gpus * (MULTI_GPU_EFFICIENCY if gpus > 1 else 1.0)
