"""Thin fixes over accelerate 1.15: FSDP on CPU and unconnected processes (tested by tests/test_distributed.py), and
a per-step package lookup (tests/test_accelerate_fixes.py)."""

from __future__ import annotations

import functools
import os

from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from recipes.core.config import ConfigError


def keep_fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Run an FSDP config as FSDP when the processes are on CPU (gloo), instead of silently as DDP.

    accelerate 1.15 turns a launch into FSDP only for accelerator device types (MULTI_GPU, MULTI_XPU, ...); on a
    machine without one, `accelerate launch --config_file fsdp.yaml` (with ACCELERATE_USE_CPU=1) passes every FSDP
    setting to the processes and then runs them as plain MULTI_CPU DDP. torch's FSDP2 (`fully_shard`) runs on CPU
    over gloo, so the state is set to what the config file asks for, with the plugin accelerate builds from those
    settings. FSDP1 cannot compute on a CPU: refused with the way out.
    """
    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version == 1:
        raise ConfigError("FSDP1 (fsdp_version: 1) cannot compute on a CPU (torch's FullyShardedDataParallel needs a "
                          "CUDA-like device); on this machine use accelerate_configs/fsdp2.yaml")
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate does on GPUs


def refuse_unconnected_processes(accelerator: Accelerator) -> None:
    """Stop a multi-process launch that accelerate would run as independent copies of a single-process job.

    Without CUDA, accelerate 1.15 joins a torchrun-style launch's processes only when ACCELERATE_USE_CPU=1 is set;
    otherwise it reports DistributedType.NO, wraps nothing in DDP and every process trains its own model."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and accelerator.distributed_type == DistributedType.NO:
        raise ConfigError(f"{world_size} processes were started, but with no GPU accelerate would run them as "
                          "unconnected single-process jobs; set ACCELERATE_USE_CPU=1 to train across CPU processes")


def look_up_lomo_once() -> None:
    """Answer accelerate's "is lomo-optim installed?" once per process instead of twice per optimizer step.

    accelerate 1.15's `AcceleratedOptimizer.step` calls `is_lomo_available()` twice on every step, for every
    optimizer, and each call finds the package and reads its metadata from disk (`importlib.metadata`): measured here
    at 0.75 ms a call, 1.5 ms a step, a tenth of a small model's step on a CPU (profiled with cProfile; README,
    "Speed"). What is installed does not change during a run, so the answer is cached where `step` looks it up.
    """
    import accelerate.optimizer

    if not hasattr(accelerate.optimizer.is_lomo_available, "cache_info"):
        accelerate.optimizer.is_lomo_available = functools.cache(accelerate.optimizer.is_lomo_available)
