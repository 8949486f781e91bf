"""The distributed setup a run was launched into, known before anything loads.

`accelerate launch` passes the config file's choices to the script as environment variables; recipes read them
here to refuse combinations they cannot run, at start-up. A DeepSpeed JSON named by `deepspeed_config_file` is read
for what it decides (stage, parameter offload, precision). The same description is derived from a config file for
the compatibility table (recipes/core/optimizers/compatibility.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class LaunchSetup:
    kind: str = "single"  # single | ddp | deepspeed | fsdp
    zero_stage: int = 0
    mixed_precision: str = "no"
    offload_param: bool = False  # DeepSpeed ZeRO-3 keeps the parameter partitions in CPU (or NVMe) memory

    def describe(self) -> str:
        return {"single": "a single process", "ddp": "DDP", "fsdp": "FSDP",
                "deepspeed": f"DeepSpeed ZeRO-{self.zero_stage}"}[self.kind]

    @classmethod
    def from_environment(cls) -> LaunchSetup:
        mixed = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            return cls.deepspeed(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"),
                                 os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none"), mixed,
                                 os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"))
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            return cls("fsdp", mixed_precision=mixed)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return cls("ddp", mixed_precision=mixed)
        return cls("single", mixed_precision=mixed)

    @classmethod
    def from_accelerate_config(cls, path: Path) -> LaunchSetup:
        config = yaml.safe_load(Path(path).read_text())
        kind = {"DEEPSPEED": "deepspeed", "FSDP": "fsdp", "MULTI_GPU": "ddp", "MULTI_CPU": "ddp"}.get(
            str(config.get("distributed_type")), "single")
        mixed = str(config.get("mixed_precision", "no"))
        if kind != "deepspeed":
            return cls(kind, mixed_precision=mixed)
        deepspeed = config.get("deepspeed_config") or {}
        return cls.deepspeed(deepspeed.get("zero_stage", 0), deepspeed.get("offload_param_device", "none"), mixed,
                             deepspeed.get("deepspeed_config_file"))

    @classmethod
    def deepspeed(cls, stage, offload_param_device, mixed: str, config_file: str | None) -> LaunchSetup:
        """DeepSpeed from accelerate's fields, or from the JSON file they name (which then decides)."""
        if config_file and config_file != "none":
            settings = _read_json(config_file)
            zero = settings.get("zero_optimization") or {}
            stage = zero.get("stage", 0)
            offload_param_device = (zero.get("offload_param") or {}).get("device", "none")
            for precision in ("bf16", "fp16"):  # "auto" follows accelerate's mixed_precision
                if (settings.get(precision) or {}).get("enabled") is True:
                    mixed = precision
        return cls("deepspeed", int(stage), mixed, str(offload_param_device).lower() != "none")


def _read_json(path: str) -> dict:
    """A DeepSpeed JSON config; {} if it cannot be read (accelerate itself then reports the file)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
