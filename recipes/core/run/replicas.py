"""Do all processes hold the same model? A cheap end-of-run check, recorded in results.json.

Each rank fingerprints every full parameter (float64 sum and sum of squares; ZeRO-3 partitions and FSDP shards are
gathered one parameter at a time), the fingerprints are all-gathered, and the replicas agree only if they are
bit-identical.
"""

from __future__ import annotations

import contextlib

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType


def _full_parameter(accelerator: Accelerator, param: torch.nn.Parameter):
    if accelerator.distributed_type == DistributedType.DEEPSPEED and hasattr(param, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=None)
    return contextlib.nullcontext()


def _full_model(accelerator: Accelerator, model):
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(model, writeback=False)
    return contextlib.nullcontext()


@torch.no_grad()
def replicas_identical(accelerator: Accelerator, model) -> bool:
    if accelerator.num_processes == 1:
        return True
    rows = []
    with _full_model(accelerator, model):
        for param in model.parameters():
            with _full_parameter(accelerator, param):
                if hasattr(param, "full_tensor"):  # an FSDP2 DTensor shard: gathered one parameter at a time
                    param = param.full_tensor()
                value = param.detach().double()
                rows.append(torch.stack([value.sum(), value.pow(2).sum()]))
    fingerprints = accelerator.gather(torch.stack(rows)[None])
    return all(torch.equal(fingerprints[0], other) for other in fingerprints[1:])
