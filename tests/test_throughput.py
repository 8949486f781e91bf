"""MFU: FLOPs per token by the nanoGPT/torchtitan convention, and the GPU peak table."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from recipes.core import throughput


def test_flops_per_token_counts_matmuls_without_the_input_embedding_plus_attention():
    config = LlamaConfig(num_hidden_layers=4, num_attention_heads=8, hidden_size=512, head_dim=64)
    # 6 x (1,000,000 - 200,000) + 12 x 4 layers x 8 heads x 64 x 1024 tokens
    assert throughput.flops_per_token(config, 1_000_000, 200_000, 1024) == 6 * 800_000 + 12 * 4 * 8 * 64 * 1024


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                          ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA L4", 121),
                                          ("NVIDIA GeForce RTX 4090", 165), ("NVIDIA H100 NVL", None),
                                          ("Tesla T4", None)])
def test_peak_table(name, tflops, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak = throughput.peak_flops(torch.device("cuda", 0))
    assert peak == (None if tflops is None else tflops * 1e12)
    assert ("no MFU" in throughput.mfu_note(torch.device("cuda", 0))) == (tflops is None)


def test_no_mfu_on_cpu():
    assert throughput.peak_flops(torch.device("cpu")) is None
    assert throughput.mfu_note(torch.device("cpu")) == "no MFU on a CPU"


def test_the_log_line_carries_mfu_from_the_measured_token_rate(tmp_path, fresh_accelerate_state):
    from accelerate import Accelerator

    from recipes.core.metrics import TrainingMetrics

    metrics = TrainingMetrics(Accelerator(cpu=True), tmp_path, total_steps=4, flops_per_token=1e6, peak_flops=1e9)
    for _ in range(2):
        metrics.add_step(torch.tensor(2.0), torch.tensor([512, 100]))
    record = metrics.flush(2)
    assert record["tokens_per_s"] > 0 and record["trained_tokens_per_s"] == pytest.approx(
        record["tokens_per_s"] * 100 / 512)
    assert record["mfu"] == pytest.approx(record["tokens_per_s"] * 1e6 / 1e9)
    assert metrics.sync_tokens() == (1024, 200)
    metrics.close()
