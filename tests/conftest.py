"""Helpers that run recipes the way users do: `accelerate launch --config_file accelerate_configs/<file> recipes/<name>.py`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "accelerate_configs"


def offline_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def launch(recipe: str, *args: str, config: str = "cpu.yaml", env: dict | None = None, check: bool = True,
           timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a recipe exactly as the README says; with check=True, fail the test with the run's output on error."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
           str(REPO / "recipes" / f"{recipe}.py"), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=offline_env(**(env or {})), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                    f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(output_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(output_dir) if "loss" in r]


def results(output_dir: Path) -> dict:
    return json.loads((output_dir / "results.json").read_text())


def reset_accelerate_state() -> None:
    """In-process tests build several Accelerators; accelerate keeps process-wide state between them."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    yield
    reset_accelerate_state()


@pytest.fixture(scope="session", autouse=True)
def deepspeed_cpu_ops_built():
    """DeepSpeed JIT-compiles its CPU ops (shared-memory comm, CPU Adam) on first use (minutes, cold). Build them
    once here, before any test launches processes that would race to build them; cached, this takes seconds."""
    code = ("from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder, CPUAdamBuilder\n"
            "ShareMemCommBuilder().load(); CPUAdamBuilder().load()")
    proc = subprocess.run([sys.executable, "-c", code], env=offline_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"building DeepSpeed's CPU ops failed:\n{proc.stderr[-3000:]}"
