"""LOMO and AdaLomo on DeepSpeed ZeRO-3 partitions, without DeepSpeed's engine (written for deepspeed 0.19.8).

ZeRO-3 is the LOMO paper's own setting, and lomo-optim has a ZeRO-3 path: each hook all-reduces a parameter's full
gradient and updates this rank's slice of it (`param.ds_tensor`). But DeepSpeed's engine owns backward (accelerate
passes `learning_rate` into `engine.backward`, a TypeError; the engine refuses a bare `loss.backward()`), and its
ZeRO-3 optimizer expects to reduce and step gradients itself. So under ZeRO-3 the fused recipes use only the part of
DeepSpeed that partitions parameters:

- `partition(model, ...)`: `DeepSpeedZeRoOffload` splits every parameter across the processes (as `zero.Init` does
  at load time) and hooks the modules so that each forward and backward gathers a layer's parameters just before it
  runs and frees them after. Every parameter is partitioned (persistence threshold 0): lomo-optim writes only the
  partition, so a parameter kept whole would go stale.
- `release_gathered(model)`: after backward, frees what DeepSpeed's hooks leave gathered (layers whose input needs
  no gradient, such as the embedding, never get their post-backward hook).
- `FullParameters`: checkpoints hold every parameter whole (gathered one at a time, written by rank 0), so a resume
  restores each rank's partition exactly; `gathered_state_dict` does the same for the final save_pretrained.
- lomo-optim 0.1.1's AdaLomo reads `self.dp_rank` on this path and never sets it: `partition` returns the rank.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

_OFFLOAD = "_engine_free_zero3"  # the DeepSpeedZeRoOffload kept on the module it partitions


def runs_engine_free(launch_kind: str, zero_stage: int) -> bool:
    return launch_kind == "deepspeed" and zero_stage == 3


def _complete_config(deepspeed_config: dict, micro_batch_size: int, mixed_precision: str) -> dict:
    """accelerate's DeepSpeed config with the "auto" entries it fills only when it builds an engine filled."""
    config = copy.deepcopy(deepspeed_config)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    config.update(train_micro_batch_size_per_gpu=micro_batch_size, gradient_accumulation_steps=1,
                  train_batch_size=micro_batch_size * world_size, gradient_clipping=0.0)
    config["zero_optimization"] = {k: v for k, v in config["zero_optimization"].items() if v != "auto"}
    for precision in ("fp16", "bf16"):
        if (config.get(precision) or {}).get("enabled") == "auto":
            config[precision]["enabled"] = mixed_precision == precision
    return config


def partition(model: torch.nn.Module, deepspeed_config: dict, micro_batch_size: int, mixed_precision: str,
              device: torch.device) -> int:
    """Partition the model's parameters across the processes and gather them per layer on use; return this rank."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    config = _complete_config(deepspeed_config, micro_batch_size, mixed_precision)
    loaded_partitioned = any(hasattr(p, "ds_id") for p in model.parameters())  # from_pretrained under zero.Init
    if config.get("bf16", {}).get("enabled") is True and not loaded_partitioned:
        model.to(torch.bfloat16)  # as DeepSpeed's engine does: 16-bit weights (and LOMO keeps no fp32 master copy)
    for module in model.modules():  # buffers (e.g. rotary frequencies) are not partitioned: place them
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    zero = DeepSpeedConfig(config).zero_config
    offload = DeepSpeedZeRoOffload(model, timers=None, ds_config=config, param_persistence_threshold=0,
                                   model_persistence_threshold=0, prefetch_bucket_size=zero.prefetch_bucket_size,
                                   max_live_parameters=zero.max_live_parameters,
                                   max_reuse_distance=zero.max_reuse_distance)
    setattr(model, _OFFLOAD, offload)
    return dist.get_rank()


def is_partitioned(model: torch.nn.Module) -> bool:
    return hasattr(model, _OFFLOAD)


def release_gathered(model: torch.nn.Module) -> None:
    getattr(model, _OFFLOAD).partition_all_parameters()


def _gathered(param: torch.nn.Parameter, modifier_rank=None):
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=modifier_rank)


@torch.no_grad()
def _gathered_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole on rank 0 (in CPU memory, gathered one at a time); empty on the other ranks."""
    whole = {}
    for name, param in model.named_parameters():
        with _gathered(param):
            if dist.get_rank() == 0:
                whole[name] = param.detach().to("cpu", copy=True)
    return whole


def gathered_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict, whole, on rank 0 (for save_pretrained); every rank must call it."""
    state = _gathered_parameters(model)
    if dist.get_rank() == 0:
        persistent = model.state_dict().keys()
        state.update({name: b.detach().cpu() for name, b in model.named_buffers() if name in persistent})
    return state


class FullParameters:
    """The partitioned model as accelerate's checkpointing sees it (`register_for_checkpointing`): whole tensors."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return _gathered_parameters(self.model)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        if set(state) != set(params):
            raise ValueError("the checkpoint's parameters do not match this model's")
        for name, param in params.items():
            with _gathered(param, modifier_rank=0):  # rank 0 writes the whole tensor; every rank keeps its slice
                if dist.get_rank() == 0:
                    param.copy_(state[name])
