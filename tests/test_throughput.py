"""MFU: FLOPs per token by the nanoGPT/torchtitan convention, the GPU peak table, a CPU's measured matmul rate."""

from __future__ import annotations

import pytest
import torch
from optimizer_recipes.core.run import throughput
from transformers import LlamaConfig


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_cpu_run_has_mfu_against_its_measured_matmul_rate(dtype):
    peak = throughput.peak_flops(torch.device("cpu"), dtype)
    assert 1e8 < peak < 1e14  # positive and finite; no timing is asserted
    name = throughput.DTYPE_NAMES[dtype]
    assert throughput.peak_flops_source(torch.device("cpu"), dtype) == f"measured cpu {name} matmul"
    assert f"MFU against this CPU's measured {name} matmul rate" in throughput.mfu_note(torch.device("cpu"), dtype)


def test_a_cpu_without_native_bf16_says_so_at_start_up(monkeypatch):
    """Measured on an AVX2-only AMD EPYC: bf16 matmuls at 0.3-1.4 GFLOP/s against 70-110 in fp32. The start-up
    measurement then uses the small probe (the 2048^3 one took 4 minutes) and the start-up line warns."""
    rates = {torch.bfloat16: (1e9, throughput.PROBE_MATMUL), torch.float32: (1e11, throughput.STARTUP_MATMUL)}
    monkeypatch.setattr(throughput, "startup_cpu_matmul", lambda dtype: rates[dtype])
    note = throughput.mfu_note(torch.device("cpu"), torch.bfloat16)
    assert "measured bf16 matmul rate (1.0 GFLOP/s, 256^3" in note
    assert "WARNING: this CPU runs bf16 matmuls at 1.0 GFLOP/s against 100 in fp32" in note
    assert "makes this run many times slower; drop it here" in note
    assert "WARNING" not in throughput.mfu_note(torch.device("cpu"), torch.float32)
    rates[torch.bfloat16] = (4e11, throughput.STARTUP_MATMUL)  # native bf16 (AMX): no warning
    assert "WARNING" not in throughput.mfu_note(torch.device("cpu"), torch.bfloat16)


def test_the_compute_dtype_follows_autocast_then_the_weights():
    model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    assert throughput.compute_dtype("bf16", torch.nn.Linear(2, 2)) == torch.bfloat16
    assert throughput.compute_dtype("no", model) == torch.bfloat16
    assert throughput.compute_dtype("no", torch.nn.Linear(2, 2)) == torch.float32


def test_results_carry_mfu_achieved_flops_and_what_they_are_against(tmp_path):
    from tests.conftest import results, run_here

    run_here("adamw", "--max_steps", "3", "--logging_steps", "1", "--output_dir", str(tmp_path / "out"))
    done = results(tmp_path / "out")
    assert 0 < done["mfu"] <= 1 and done["peak_flops_source"] == "measured cpu fp32 matmul"
    assert done["achieved_flops_per_s"] == pytest.approx(done["mfu"] * done["peak_flops_per_s"], rel=1e-6)


def test_matmul_rate_command_prints_its_table(tmp_path):
    import json
    import subprocess
    import sys

    from tests.conftest import REPO, offline_env

    proc = subprocess.run([sys.executable, str(REPO / "launch" / "matmul_rate.py"), "--sizes", "64,32x64x16",
                           "--rounds", "2", "--threads", "1", "--output", str(tmp_path / "rates.json")],
                          cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| 64 x 64 x 64 |" in proc.stdout and "| 32 x 64 x 16 |" in proc.stdout and "bf16 / fp32" in proc.stdout
    assert "CPU" in proc.stdout or "CUDA" in proc.stdout  # the hardware is named
    rows = json.loads((tmp_path / "rates.json").read_text())["rows"]
    assert {r["dtype"] for r in rows} == {"fp32", "bf16"} and all(r["gflops"] > 0 for r in rows)


def test_the_log_line_carries_mfu_from_the_measured_token_rate(tmp_path, fresh_accelerate_state):
    from accelerate import Accelerator
    from optimizer_recipes.core.run.metrics import TrainingMetrics

    metrics = TrainingMetrics(Accelerator(cpu=True), tmp_path, total_steps=4, flops_per_token=1e6, peak_flops=1e9)
    for _ in range(2):
        metrics.add_step(torch.tensor(2.0), torch.tensor([512, 100]))
    record = metrics.flush(2)
    assert record["tokens_per_s"] > 0 and record["trained_tokens_per_s"] == pytest.approx(
        record["tokens_per_s"] * 100 / 512)
    assert record["mfu"] == pytest.approx(record["tokens_per_s"] * 1e6 / 1e9)
    assert metrics.sync_tokens() == (1024, 200)
    metrics.close()


def test_precision_speed_command_runs_each_precision(tmp_path):
    import json
    import subprocess
    import sys

    from tests.conftest import REPO, offline_env

    proc = subprocess.run([sys.executable, str(REPO / "launch" / "precision_speed.py"), "--max_steps", "3",
                           "--warmup", "1", "--rounds", "1", "--block_size", "32", "--per_device_train_batch_size",
                           "2", "--output", str(tmp_path / "runs.json")], cwd=REPO, env=offline_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(f"| {name} |" in proc.stdout for name in ("fp32", "bf16 autocast", "bf16 weights rounded stochastically",
                                                         "bf16 weights rounded to nearest"))
    runs = json.loads((tmp_path / "runs.json").read_text())["runs"]
    assert all(r["seconds_per_step"] > 0 and r["eval_loss"] > 0 for rows in runs.values() for r in rows)
