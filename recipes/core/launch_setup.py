"""The distributed setup a run was launched into, known before anything loads.

`accelerate launch` passes the config file's choices to the script as environment variables; recipes read them
here to refuse combinations they cannot run, at start-up. The same description is derived from a config file for
the compatibility table (recipes/core/compatibility.py).
"""

from __future__ import annotations

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
            offload = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none").lower() != "none"
            return cls("deepspeed", int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")), mixed, offload)
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
        deepspeed = (config.get("deepspeed_config") or {}) if kind == "deepspeed" else {}
        offload = str(deepspeed.get("offload_param_device", "none")).lower() != "none"
        return cls(kind, int(deepspeed.get("zero_stage", 0)), str(config.get("mixed_precision", "no")), offload)
