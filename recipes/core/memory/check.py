"""Pre-flight: does this run fit on its device? Answered from the model's config before any weight loads.

The memory estimator (`recipes/core/memory/estimate.py`) gives the run's peak per device from the config, the
recipe, the precision, the batch and the launch (ZeRO stage, process count); the process's own baseline is added
(`PROCESS_BASELINE`: Python, torch, transformers, datasets and the rest, measured). That is set against what the
device has: CUDA, this process's GPU's free memory; a CPU, the machine's available RAM (and its cgroup's limit, if
lower) shared by every process of the run on the machine. The estimator's measured error (`ESTIMATE_ERROR`, see
docs/memory.md) is the margin on both sides:
- below the estimate's low end, the run cannot fit: refused (`--memory_check error`, the default) in one line with
  what would fit, or only said (`warn`);
- between its low and high ends (on a CPU the high end adds `ALLOCATOR_SLACK`, the freed memory glibc's heap keeps)
  it may not fit: said, and the run starts;
- above its high end: nothing is said. `--memory_check off` skips the check.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import torch
from optimizer_recipes.core.memory.estimate import estimate_each, meta_model
from optimizer_recipes.core.run.config import Config, ConfigError, default_block_size
from optimizer_recipes.core.run.launch_setup import LaunchSetup

GIB = 1024**3
# How far the estimator's run peak has been from the measured peak (tests/test_memory.py holds it to this; the
# measured figures are in docs/memory.md).
ESTIMATE_ERROR = 0.10
# What a recipe's process holds beyond its tensors, by device: on a CPU the whole process's RSS (measured: a
# 2-step run of the embedded model, whose tensors are ~10 MiB, peaks at 0.53 GiB RSS); on CUDA the free memory is
# read after the CUDA context exists, so only the caching allocator's slack is left, which the margin covers.
PROCESS_BASELINE = {"cpu": 0.5 * GIB, "cuda": 0}
# Memory a CPU process's allocator keeps after tensors are freed (glibc's heap), on top: measured 0.1 GiB (a 19M
# model, fp32 AdamW) to 1.2 GiB (SmolLM2-135M, fp32 AdamW, docs/memory.md); only the "may not fit" side counts it,
# so that the check never refuses a run on memory it may not need.
ALLOCATOR_SLACK = {"cpu": 1.5 * GIB, "cuda": 0}
SHARDING_SIZES = (2, 4, 8, 16, 32, 64)
SHARDING_CONFIGS = ("zero3.yaml", "fsdp2.yaml")  # parameters, gradients and optimizer state split over N devices
CONFIG_DIR = Path(__file__).resolve().parents[3] / "accelerate_configs"


def check_memory(recipe, config: Config, model_config) -> str:
    """Raise ConfigError if the run cannot fit (under --memory_check error); return a note for the start-up line."""
    t = config.train
    if t.memory_check == "off":
        return ""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    available, where = _budget(config, device)
    setting = _estimate_setting(config, model_config)
    try:
        model = meta_model(None, config.model.trust_remote_code, config=model_config)
        needs = _needs_each([recipe], model, setting, device)[recipe.name]
    except Exception as error:  # an architecture the meta-device forward cannot run: no check, said so
        return f"memory: no estimate for this model ({type(error).__name__}: {str(error)[:120]}), not checked"
    baseline = PROCESS_BASELINE[device]
    low = baseline + (needs - baseline) * (1 - ESTIMATE_ERROR)
    high = baseline + (needs - baseline) * (1 + ESTIMATE_ERROR) + ALLOCATOR_SLACK[device]
    if low > available:
        message = (f"this run needs about {needs / GIB:.1f} GiB per device (estimate: "
                   f"{_describe(setting)}) and {where.format(f'{available / GIB:.1f} GiB')}; "
                   f"{_what_would_fit(recipe, config, model, setting, device, available)}")
        if t.memory_check == "error":
            raise ConfigError(f"{message}; --memory_check warn starts it anyway")
        print(f"{recipe.name}: warning: {message}; starting it anyway (--memory_check warn)", file=sys.stderr)
        return ""
    if high > available:
        return (f"memory: this run needs about {needs / GIB:.1f} GiB per device (estimate, up to {high / GIB:.1f}) and "
                f"{where.format(f'{available / GIB:.1f} GiB')}: it may not fit")
    return f"memory: about {needs / GIB:.1f} GiB per device (estimate); {where.format(f'{available / GIB:.1f} GiB')}"


def _budget(config: Config, device: str) -> tuple[int, str]:
    """What this process may use, and the words that say where it comes from."""
    if config.train.memory_budget_gib is not None:
        return int(config.train.memory_budget_gib * GIB), "--memory_budget_gib allows {}"
    if device == "cuda":
        index = int(os.environ.get("LOCAL_RANK", "0"))
        free, _ = torch.cuda.mem_get_info(index)
        return free, f"GPU {index} has {{}} free"
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    available = cpu_available_bytes()
    shared = f" ({available / GIB:.1f} GiB shared by {processes} processes)" if processes > 1 else ""
    return available // processes, "the machine has {} available" + shared


def cpu_available_bytes() -> int:
    """The machine's available RAM (MemAvailable), or what its cgroup (v2) still allows if that is less."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:  # not Linux: the total, as the nearest thing torch can tell
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


@dataclasses.dataclass(frozen=True)
class _Setting:
    precision: str
    micro_batch: int
    seq_len: int
    eval_batch: int
    gradient_checkpointing: bool
    chunked_loss: bool
    world_size: int
    zero_stage: int


def _estimate_setting(config: Config, model_config) -> _Setting:
    t, launch = config.train, config.launch
    return _Setting(precision=run_precision(config, model_config), micro_batch=t.per_device_train_batch_size,
                    seq_len=config.data.block_size or default_block_size(model_config),
                    eval_batch=t.per_device_eval_batch_size, gradient_checkpointing=t.gradient_checkpointing,
                    chunked_loss=t.chunked_loss, world_size=int(os.environ.get("WORLD_SIZE", "1")),
                    # FSDP shards parameters, gradients and optimizer state as ZeRO-3 does
                    zero_stage=3 if launch.kind == "fsdp" else launch.zero_stage)


def run_precision(config: Config, model_config) -> str:
    """The estimator's name for how this run keeps its weights: DeepSpeed's 16-bit mixed precision ("bf16-mixed":
    16-bit weights and an fp32 master copy), 16-bit weights throughout (--dtype bfloat16 or float16, or auto on a
    16-bit checkpoint: "bf16" where updates are rounded stochastically, "bf16-nearest" where not), else fp32
    (autocast, --bf16 true, keeps the weights fp32)."""
    launch = config.launch
    if launch.kind == "deepspeed" and launch.mixed_precision in ("bf16", "fp16"):
        return f"{launch.mixed_precision}-mixed"
    dtype = config.model.dtype
    if dtype == "auto":
        saved = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
        dtype = str(saved).replace("torch.", "") if saved is not None else "float32"
    if dtype == "bfloat16":
        return "bf16" if config.train.stochastic_rounding else "bf16-nearest"
    return "bf16-nearest" if dtype == "float16" else "fp32"


def _describe(s: _Setting) -> str:
    launch = f", ZeRO-3 over {s.world_size}" if s.zero_stage == 3 and s.world_size > 1 else ""
    return (f"{s.precision}, {s.micro_batch} x {s.seq_len} tokens"
            + (", gradient checkpointing" if s.gradient_checkpointing else ", no gradient checkpointing") + launch)


def _needs_each(recipes, model, setting: _Setting, device: str) -> dict[str, int]:
    """Each recipe's run peak per device (the estimate) plus the process's baseline."""
    estimates = estimate_each(recipes, model, setting.precision, setting.micro_batch, setting.seq_len,
                              setting.gradient_checkpointing, setting.world_size, setting.zero_stage,
                              setting.eval_batch, setting.chunked_loss)
    return {name: e.total + PROCESS_BASELINE[device] for name, e in estimates.items()}


def _what_would_fit(recipe, config: Config, model, setting: _Setting, device: str, available: int) -> str:
    """Other recipes that run this configuration and fit; recipes that fit stepped in backward
    (--optimizer_in_backward); gradient checkpointing, if it is off and would make this recipe (or else another) fit;
    and over how many devices ZeRO-3 would shard this run for it to fit."""
    from optimizer_recipes.core.optimizers.protocol import all_recipes

    others = [r for r in all_recipes() if r.name != recipe.name and _runs(r, config)]
    ways = [_listed(_fitting(others, model, setting, device, available))]
    if not recipe.updates_in_backward:  # one gradient at a time instead of all: this recipe, or another, may fit
        stepped_in_backward = dataclasses.replace(config, train=dataclasses.replace(config.train,
                                                                                     optimizer_in_backward=True))
        candidates = [r.for_run(stepped_in_backward) for r in all_recipes() if not r.updates_in_backward]
        ways.append(_listed(_fitting([r for r in candidates if _runs(r, stepped_in_backward)], model, setting,
                                     device, available), " with --optimizer_in_backward true"))
    if not setting.gradient_checkpointing:
        checkpointed = dataclasses.replace(setting, gradient_checkpointing=True)
        needs = _needs_each([recipe], model, checkpointed, device)[recipe.name]
        if needs <= available:
            ways.append(f"--gradient_checkpointing true needs {needs / GIB:.1f} GiB")
        elif not ways[0]:
            ways.append(_listed(_fitting(others, model, checkpointed, device, available), " with "
                                "--gradient_checkpointing true"))
    sharding = next((f for f in SHARDING_CONFIGS if _runs(recipe, dataclasses.replace(
        config, launch=LaunchSetup.from_accelerate_config(CONFIG_DIR / f)))), None)  # one the recipe accepts
    for devices in SHARDING_SIZES if sharding else ():
        sharded = dataclasses.replace(setting, world_size=devices, zero_stage=3)  # FSDP2 shards as ZeRO-3 does
        if devices > setting.world_size and _needs_each([recipe], model, sharded, device)[recipe.name] <= available:
            ways.append(f"shard it: accelerate_configs/{sharding} over {devices} devices of this size")
            break
    ways = [way for way in ways if way]
    return "; or ".join(ways) if ways else "no recipe fits at this batch and sequence length on this device"


def _fitting(recipes, model, setting: _Setting, device: str, available: int) -> list[tuple[str, int]]:
    return sorted(((name, needs) for name, needs in _needs_each(recipes, model, setting, device).items()
                   if needs <= available), key=lambda item: item[1])


def _listed(fits: list[tuple[str, int]], condition: str = "") -> str:
    """'lomo (14.0 GiB) and adalomo (14.6 GiB) fit', or '' for none."""
    names = [f"{name} ({needs / GIB:.1f} GiB)" for name, needs in fits]
    if not names:
        return ""
    return (", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]) \
        + (" fit" if len(names) > 1 else " fits") + condition


def _runs(recipe, config: Config) -> bool:
    """Whether `recipe` would accept this run's settings (with its own LR schedule and clipping defaults)."""
    train = dataclasses.replace(config.train, lr_scheduler_type=None, max_grad_norm=None)
    trial = dataclasses.replace(config, train=train, optim=dataclasses.replace(config.optim), recipe=recipe.name,
                                defaults_used={})  # copies: fill_defaults writes into them
    recipe.fill_defaults(trial)
    return recipe.refuse(trial) is None
