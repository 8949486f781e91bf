"""--torch_compile: the model's decoder blocks compiled in place with torch.compile (inductor), before accelerate
wraps the model.

What is compiled, and why not the whole model (what the Trainer's `torch_compile=True` does, through accelerate):
- The decoder blocks hold nearly all of the compute. One block's compiled code serves every block (same code, the
  parameters as inputs), so the compile costs one block's time, not the whole model's (PyTorch's "regional
  compilation").
- The output layer and the loss stay eager: the chunked loss (recipes/core/run/token_loss.py) selects the trained
  positions, a shape that changes with every batch, and runs its own autograd function a chunk at a time; inside a
  graph it would recompile or break the graph at each batch, and its memory saving is the point of it. accelerate's
  own regional compilation compiles the output layer too, and the Trainer's compiles the whole model.
- In place (`nn.Module.compile`), so the hooks DDP, DeepSpeed, FSDP2 and the fused LOMO/AdaLomo updates register
  later still run, and the state dict keeps its names (`torch.compile(module)` returns a wrapper whose keys gain
  `_orig_mod.`, which checkpoints and save_pretrained would carry).
Gradient hooks (the fused updates, DDP's reducer, FSDP2's reduce-scatter) run outside the compiled graph: autograd
calls them as each parameter's gradient leaves the compiled backward. Gradient checkpointing wraps each compiled
block (the recomputation runs the compiled forward again).
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

import torch
from optimizer_recipes.core.run.config import Config, ConfigError

CPU_COMPILERS = ("g++", "clang++", "c++")  # inductor writes and builds C++ for a CPU


def problem(config: Config) -> Optional[str]:
    """Why --torch_compile cannot run here (mode, toolchain, launch config), or None; from the flags alone."""
    t = config.train
    accelerate_backend = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    if accelerate_backend != "no":
        return (f"the accelerate config sets dynamo_backend {accelerate_backend.upper()}, which would compile the "
                "whole model around the chunked loss; remove dynamo_config from the config file and pass "
                "--torch_compile true (the decoder blocks, compiled in place)")
    if not t.torch_compile:
        return None
    launch = config.launch
    if launch.kind == "deepspeed" and launch.zero_stage == 3:
        # measured (deepspeed 0.19.8, torch 2.13, 2 processes): dynamo traces ZeRO-3's hooks inside every block,
        # recompiles per layer and module type, hits its recompile limit (8) and runs those frames eager
        return (f"--torch_compile under {launch.describe()} would mostly run eager: ZeRO-3 gathers each layer's "
                "parameters in hooks inside the compiled blocks, which torch.compile retraces layer by layer until "
                "its recompile limit; compile with accelerate_configs/zero2.yaml, fsdp2.yaml (sharded parameters) "
                "or multi_gpu.yaml, or drop --torch_compile")
    if torch.cuda.is_available():
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            return ("--torch_compile on a GPU needs triton (inductor writes its kernels in it), which is not "
                    "installed: pip install triton, or drop --torch_compile")
    elif not any(shutil.which(name) for name in (os.environ.get("CXX", "g++"), *CPU_COMPILERS)):
        return ("--torch_compile on a CPU needs a C++ compiler (inductor builds C++ for it), and none of "
                f"{', '.join(CPU_COMPILERS)} is on PATH; install one (e.g. apt install g++) or drop --torch_compile")
    return None


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated decoder blocks: the modules of the classes it names as never to be split across
    devices (`_no_split_modules`, what FSDP wraps one by one)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_decoder_blocks(model: torch.nn.Module, mode: str | None) -> str:
    """Compile each decoder block in place (lazily: the first forward compiles); returns the start-up line."""
    blocks = decoder_blocks(model)
    if not blocks:
        raise ConfigError(f"--torch_compile compiles the model's decoder blocks, and {type(model).__name__} names none "
                          "(_no_split_modules is empty); drop --torch_compile for this model")
    for block in blocks:
        block.compile(mode=None if mode == "default" else mode)
    return (f"compile: {len(blocks)} {type(blocks[0]).__name__} blocks with torch.compile (mode {mode or 'default'}), "
            "the output layer and the loss eager; the first steps include the compile time")


def compile_summary(config: Config) -> dict:
    """For results.json: how many graphs torch.compile built in this process (none without --torch_compile)."""
    if not config.train.torch_compile:
        return {}
    from torch._dynamo.utils import counters

    return {"compiled_graphs": int(counters["stats"]["unique_graphs"])}
