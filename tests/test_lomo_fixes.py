"""The AdaLomo shim: upstream cannot be built on CPU; ours can, stays an AdaLomo, and trains."""

from __future__ import annotations

import pytest
import torch
from lomo_optim import AdaLomo
from optimizer_recipes.core.fused_backward.lomo_fixes import AdaLomoOnModelDevice


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def test_upstream_adalomo_ignores_the_model_device():
    # lomo-optim 0.1.1 puts its state on CUDA whatever the model's device: an error on a CPU-only torch, state on
    # the wrong device otherwise. If this starts failing, upstream is fixed and the shim can go.
    if not torch.cuda.is_available():
        with pytest.raises((AssertionError, RuntimeError)):
            AdaLomo(tiny_model(), lr=1e-2)
    else:
        opt = AdaLomo(tiny_model(), lr=1e-2)
        assert next(iter(opt.exp_avg_sq_row.values())).is_cuda


def test_adalomo_on_model_device_builds_keeps_state_there_and_learns():
    model = tiny_model()
    opt = AdaLomoOnModelDevice(model, lr=1e-1, loss_scale=1.0)
    assert isinstance(opt, AdaLomo)  # accelerate's LOMO backward path keys on this
    states = [*opt.exp_avg_sq.values(), *opt.exp_avg_sq_row.values(), *opt.exp_avg_sq_col.values()]
    assert states and all(s.device == next(model.parameters()).device for s in states)
    assert torch.Tensor.cuda is not None and "lambda" not in repr(torch.Tensor.cuda)  # patch undone
    x = torch.randn(64, 8)
    y = x.sum(dim=1, keepdim=True)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.fused_backward(loss, lr=1e-1)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is None for p in model.parameters())  # no gradient kept: the point of LOMO
