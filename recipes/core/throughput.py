"""Model FLOPs utilisation (MFU): achieved training FLOP/s over the GPU's peak, the nanoGPT / torchtitan convention.

FLOPs per trained-on token = 6 x (parameters - input embedding) + 12 x layers x heads x head_dim x sequence length:
forward and backward of every matmul, plus attention's scores and weighted values, at the row length (for packed
examples an upper bound: each example attends only to itself). Recomputation under gradient checkpointing is not
counted (it is not useful work). The peak is the GPU's dense bf16 figure whatever the run's precision; an unknown
GPU, or no GPU, gives no MFU.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Optional

import torch

# dense bf16 TFLOP/s; matched against torch.cuda.get_device_name, most specific first
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", None), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
                    ("L4", 121.0), ("RTX 4090", 165.0))


def hardware() -> str:
    """The accelerator or CPU a measurement ran on, for the reports."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
    return f"CPU: {cpu}, {os.cpu_count()} cores"


def peak_flops(device: torch.device) -> Optional[float]:
    """The device's dense bf16 peak in FLOP/s, or None (CPU, or a GPU not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return None if tflops is None else tflops * 1e12
    return None


def flops_per_token(model_config, num_parameters: int, embedding_parameters: int, sequence_length: int) -> float:
    layers = getattr(model_config, "num_hidden_layers", 0)
    heads = getattr(model_config, "num_attention_heads", 0)
    head_dim = getattr(model_config, "head_dim", None) or (getattr(model_config, "hidden_size", 0) // max(heads, 1))
    return 6 * (num_parameters - embedding_parameters) + 12 * layers * heads * head_dim * sequence_length


def mfu_note(device: torch.device) -> str:
    """Said once at start-up."""
    if peak_flops(device) is not None:
        return f"MFU against the {torch.cuda.get_device_name(device)}'s dense bf16 peak"
    if device.type != "cuda":
        return "no MFU on a CPU"
    return f"no MFU: {torch.cuda.get_device_name(device)} is not in the peak table (recipes/core/throughput.py)"
