"""Thin fixes over lomo-optim 0.1.1 defects, each named after what it fixes and tested in tests/test_lomo_fixes.py."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from lomo_optim import AdaLomo


@contextlib.contextmanager
def _cuda_calls_go_to(device: torch.device) -> Iterator[None]:
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda tensor, *args, **kwargs: tensor.to(device)
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def average_gradients_across_processes(model: torch.nn.Module) -> None:
    """Make every gradient LOMO sees the mean over all processes (call before building Lomo/AdaLomo).

    lomo-optim 0.1.1's non-ZeRO update has no all-reduce: under DDP each process would update its replica with its
    own local gradient and the replicas drift apart. A tensor hook registered first replaces each parameter's
    gradient with its all-reduced mean before LOMO's hook consumes it; the loop runs LOMO's backward under
    `no_sync`, so DDP's own reducer adds nothing. Backward order is the same on every rank, so the collectives match.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return

    def averaged(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # autograd may share the incoming buffer
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad.div_(dist.get_world_size())

    for p in model.parameters():
        if p.requires_grad:
            p.register_hook(averaged)


class AdaLomoOnModelDevice(AdaLomo):
    """AdaLomo whose second-moment state lives on the model's device.

    lomo-optim 0.1.1 allocates that state with `.cuda()` in `__init__`, which fails on a CPU-only torch and ignores
    the model's device. Only construction changes; `isinstance(opt, AdaLomo)` stays true, so accelerate's LOMO
    backward path still applies.

    Its second moments and step count are plain attributes, outside `state_dict()`, so a resume would restart them;
    here they travel in the state dict (under "second_moments", keyed by parameter name).
    """

    def __init__(self, model: torch.nn.Module, *args, **kwargs):
        device = next(model.parameters()).device
        with _cuda_calls_go_to(device):
            super().__init__(model, *args, **kwargs)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "second_moments": {
            "step_num": self.step_num, "exp_avg_sq": self.exp_avg_sq, "exp_avg_sq_row": self.exp_avg_sq_row,
            "exp_avg_sq_col": self.exp_avg_sq_col}}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("second_moments")
        super().load_state_dict(state_dict)
        self.step_num = extra["step_num"]
        for name in ("exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col"):
            mine = getattr(self, name)
            if set(extra[name]) != set(mine):
                raise ValueError(f"AdaLomo state does not match this model: {name} covers other parameters")
            for key, value in extra[name].items():
                mine[key].copy_(value)
