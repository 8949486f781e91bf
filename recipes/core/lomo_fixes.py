"""Thin fixes over lomo-optim 0.1.1 defects, each named after what it fixes and tested in tests/test_lomo_fixes.py."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from lomo_optim import AdaLomo


@contextlib.contextmanager
def _cuda_calls_go_to(device: torch.device) -> Iterator[None]:
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda tensor, *args, **kwargs: tensor.to(device)
    try:
        yield
    finally:
        torch.Tensor.cuda = original


class AdaLomoOnModelDevice(AdaLomo):
    """AdaLomo whose second-moment state lives on the model's device.

    lomo-optim 0.1.1 allocates that state with `.cuda()` in `__init__`, which fails on a CPU-only torch and ignores
    the model's device. Only construction changes; `isinstance(opt, AdaLomo)` stays true, so accelerate's LOMO
    backward path still applies.
    """

    def __init__(self, model: torch.nn.Module, *args, **kwargs):
        device = next(model.parameters()).device
        with _cuda_calls_go_to(device):
            super().__init__(model, *args, **kwargs)
