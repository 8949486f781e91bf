"""Thin fixes over accelerate 1.15: FSDP on CPU and unconnected processes (tested by tests/test_distributed.py), a
per-step package lookup (tests/test_accelerate_fixes.py), and a resume's second copy of the weights
(tests/test_checkpoint_memory.py)."""

from __future__ import annotations

import contextlib
import functools
import os

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from optimizer_recipes.core.run.config import ConfigError


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


@contextlib.contextmanager
def checkpoint_weights_loaded_in_place():
    """Inside, `accelerator.load_state` reads the checkpoint's model weights into the model's own tensors, one tensor
    at a time, instead of loading the whole file first.

    accelerate 1.15's `load_state` loads `model.safetensors` with safetensors' `load_model`, which reads the whole
    file into a new state dict (`load_file`) and then copies it into the model: a second copy of the weights at the
    resume's peak (measured: LLaMA-7B in bf16 resumed at 19.7 GiB with it, 13.1 GiB loading and 14.7 GiB training
    with this; a 0.54B model's resume loading 2.50 against 1.55 GiB). Here the extra memory is the largest tensor. The rest of `load_state` (optimizer, scheduler, RNG) is
    accelerate's own.
    """
    import accelerate.checkpointing

    whole_file_load = accelerate.checkpointing.load_model
    accelerate.checkpointing.load_model = load_weights_in_place
    try:
        yield
    finally:
        accelerate.checkpointing.load_model = whole_file_load


def load_weights_in_place(model, filename, strict: bool = True, device="cpu", **_) -> tuple[list, list]:
    """safetensors.torch.load_model's contract (missing and unexpected names; tied weights saved once count as
    loaded), with each tensor read (pread, not mmap: no file pages held in the process) and copied into place."""
    from safetensors import safe_open

    targets = model.state_dict()  # detached views of the model's parameters and buffers
    try:
        opened = safe_open(filename, framework="pt", device="cpu", backend="pread")
    except TypeError:  # safetensors before the backend option: mmap, released when the file closes
        opened = safe_open(filename, framework="pt", device="cpu")
    with opened as f:
        names = list(f.keys())
        unexpected = [name for name in names if name not in targets]
        for name in names:
            if name in targets:
                with torch.no_grad():
                    targets[name].copy_(f.get_tensor(name))
    loaded = {targets[name].untyped_storage().data_ptr() for name in names if name in targets}
    missing = [name for name, tensor in targets.items()
               if name not in names and tensor.untyped_storage().data_ptr() not in loaded]
    if strict and (missing or unexpected):
        raise RuntimeError(f"{filename}: the checkpoint does not match the model (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")
    return missing, unexpected
