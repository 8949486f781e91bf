"""LOMO and AdaLomo with lomo-optim's update math, run once per parameter, as its gradient is ready.

lomo-optim 0.1.1 registers a pre-accumulation hook on every parameter, and every hook call scans every parameter for
a gradient to apply: Python work that grows with the square of the tensor count (on a 291-tensor Llama the Trainer's
`optim="lomo"`, which runs those hooks, took 2.5-2.8x its schedule-free SGD step; this module's 0.98x on one 2-core
CPU machine and 1.19x (over 3 noisy rounds) on another: launch/benchmark.py, docs/benchmark.md; it is Python time,
so a GPU pays it too). Its 16-bit update also upcasts a
whole gradient and a whole parameter to fp32 at once.

Here each parameter gets one `register_post_accumulate_grad_hook` that updates that parameter alone, with the same
arithmetic in the same order, so the weights are bit-identical to lomo-optim's (tests/test_lomo_updates.py, one
process, DDP and ZeRO-3):

- LOMO's update is elementwise, so it upcasts a 16-bit gradient and parameter `UPDATE_CHUNK` elements at a time
  (chunks change no bit). Per parameter it holds the gradient plus at most 8 bytes x `UPDATE_CHUNK`.
- AdaLomo needs whole-tensor statistics (row and column means of the squared gradient, the update's RMS, the
  parameter's RMS), which chunks would sum in another order. It keeps lomo-optim's fp32 tensors but frees each as
  soon as it is used: at most 8 bytes per element of the parameter at once, where lomo-optim holds 12.

The classes subclass lomo-optim's, so `isinstance(optimizer, Lomo)` holds and accelerate's LOMO path applies.
lomo-optim's `fused_backward` and `grad_norm` run unchanged (learning rate, loss scale, clip coefficient, the
two-pass global norm); only the scanning hook is replaced.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from lomo_optim import Lomo
from optimizer_recipes.core.fused_backward.lomo_fixes import AdaLomoOnModelDevice
from optimizer_recipes.core.models.zero3_parameters import full_numel, full_shape, local_tensor

UPDATE_CHUNK = 1 << 24  # elements of a 16-bit LOMO update upcast at once: 64 MiB per fp32 temporary


@contextlib.contextmanager
def _tensor_hooks_not_registered() -> Iterator[None]:
    """lomo-optim's __init__ registers its scanning hooks; during it, registering a tensor hook does nothing."""
    original = torch.Tensor.register_hook
    torch.Tensor.register_hook = lambda tensor, hook: None
    try:
        yield
    finally:
        torch.Tensor.register_hook = original


class _UpdateEachParameterWhenReady:
    """Mixin over Lomo/AdaLomo: one post-accumulate-grad hook per parameter runs `_update(name, parameter)`, which
    takes the gradient off the parameter (so nothing else holds it) and applies it. The new fp32 value is written
    into 16-bit weights through `rounding` (a RoundingNoise: stochastically), or copied (to nearest) where it is
    None; the noise generator's state travels in state_dict()."""

    rounding = None  # set by FusedBackwardRecipe.build_for_run (recipes/core/per_tensor/stochastic_rounding.py)

    def __init__(self, model: torch.nn.Module, *args, **kwargs):
        with _tensor_hooks_not_registered():
            super().__init__(model, *args, **kwargs)
        # lomo-optim calls grad_func once more after backward, for the last parameter; the hooks did them all
        self.grad_func = lambda placeholder: placeholder
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(functools.partial(self._gradient_ready, name))

    def _gradient_ready(self, name: str, p: torch.nn.Parameter) -> None:
        with torch.no_grad():
            self._update(name, p)

    def _write(self, weights: torch.Tensor, weights_fp32: torch.Tensor) -> None:
        """The update's fp32 result into the weights (the same tensor already when they are fp32)."""
        if self.rounding is not None:
            self.rounding.round_into(weights, weights_fp32)
        elif weights_fp32 is not weights:
            weights.copy_(weights_fp32)

    def state_dict(self) -> dict:
        packed = super().state_dict()
        if self.rounding is not None:
            packed["stochastic_rounding"] = self.rounding.state_dict()
        return packed

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        noise = state_dict.pop("stochastic_rounding", None)
        if noise is not None and self.rounding is not None:
            self.rounding.load_state_dict(noise)
        super().load_state_dict(state_dict)

    def _update(self, name: str, p: torch.nn.Parameter) -> None:
        raise NotImplementedError

    @staticmethod
    def _partition(p: torch.nn.Parameter, full: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of a ZeRO-3 parameter's full tensor (flattened), and the part of `p.ds_tensor` it
        updates (the last rank's partition is padded)."""
        partition = local_tensor(p)
        start = partition.numel() * rank
        end = min(start + partition.numel(), full.numel())
        return full.reshape(-1).narrow(0, start, end - start), partition.narrow(0, 0, end - start)


class LinearTimeLomo(_UpdateEachParameterWhenReady, Lomo):
    """lomo_optim.Lomo, updating each parameter in its own hook, 16-bit updates upcast in chunks."""

    def _update(self, name, p):
        grad, p.grad = p.grad, None
        if self.zero3_enabled:
            dist.all_reduce(grad, op=dist.ReduceOp.AVG)
        scaler = self.loss_scaler
        if scaler and (scaler.has_overflow_serial or scaler._has_inf_or_nan(grad)):
            scaler.has_overflow_serial = True  # lomo-optim drops this and every later gradient of the step
            return
        if self.gather_norm:  # first pass of global-norm clipping: the whole gradient's norm, no update
            grad_fp32 = grad.to(torch.float32)
            if scaler:
                grad_fp32.div_(scaler.loss_scale)
            self.grad_norms.append(torch.norm(grad_fp32, 2.0))
            return
        if self.zero3_enabled:
            grad, weights = self._partition(p, grad, dist.get_rank())
        else:
            grad, weights = grad.reshape(-1), p.data.view(-1)
        for start in range(0, grad.numel(), UPDATE_CHUNK):
            self._update_chunk(grad[start:start + UPDATE_CHUNK], weights[start:start + UPDATE_CHUNK])

    def _update_chunk(self, grad: torch.Tensor, weights: torch.Tensor) -> None:
        grad_fp32 = grad.to(torch.float32)
        if self.loss_scaler:
            grad_fp32.div_(self.loss_scaler.loss_scale)
        if self.clip_grad_value is not None and self.clip_grad_value > 0:
            grad_fp32.clamp_(min=-self.clip_grad_value, max=self.clip_grad_value)
        if self.clip_grad_norm is not None and self.clip_grad_norm > 0 and self.clip_coef is not None:
            grad_fp32.mul_(self.clip_coef)
        weights_fp32 = weights.to(torch.float32)
        if self.do_weight_decay:
            weights_fp32.mul_(1.0 - self.lr * self.weight_decay)
        weights_fp32.add_(grad_fp32, alpha=-self.lr)
        self._write(weights, weights_fp32)


class LinearTimeAdaLomo(_UpdateEachParameterWhenReady, AdaLomoOnModelDevice):
    """lomo_optim.AdaLomo (state on the model's device, in state_dict), updating each parameter in its own hook."""

    def _update(self, name, p):
        grad, p.grad = p.grad, None
        if self.zero3_enabled:
            dist.all_reduce(grad, op=dist.ReduceOp.AVG)
        grad_fp32 = grad.to(torch.float32)
        del grad  # a 16-bit gradient is not needed past its fp32 copy
        if self.loss_scale:
            grad_fp32.div_(self.loss_scale)
        if self.gather_norm:
            self.grad_norms.append(torch.norm(grad_fp32, 2.0))
            return
        if self.clip_grad_value is not None and self.clip_grad_value > 0:
            grad_fp32.clamp_(min=-self.clip_grad_value, max=self.clip_grad_value)
        if self.clip_grad_norm is not None and self.clip_grad_norm > 0 and self.clip_coef is not None:
            grad_fp32.mul_(self.clip_coef)

        decay_rate = -self.decay_rate if self.step_num == 0 and self.decay_rate < 0 else self.decay_rate
        beta2t = 1.0 - math.pow(self.step_num, decay_rate)
        update = grad_fp32.square().add_(self.eps[0])
        if len(full_shape(p)) > 1:
            self.exp_avg_sq_row[name].mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
            self.exp_avg_sq_col[name].mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
            del update
            update = self._approx_sq_grad(self.exp_avg_sq_row[name], self.exp_avg_sq_col[name]).mul_(grad_fp32)
        else:
            self.exp_avg_sq[name].mul_(beta2t).add_(update, alpha=1.0 - beta2t)
            del update
            update = self.exp_avg_sq[name].rsqrt().mul_(grad_fp32)
        del grad_fp32
        update.div_((self._rms(update) / self.clip_threshold).clamp_(min=1.0))

        if self.zero3_enabled:
            update, partition = self._partition(p, update, self.dp_rank)
            weights_fp32 = partition.to(torch.float32)
            p_rms = torch.norm(weights_fp32, 2.0) ** 2
            dist.all_reduce(p_rms, op=dist.ReduceOp.SUM)
            p_rms = (p_rms / full_numel(p)).sqrt()
        else:
            weights_fp32 = p.data.to(torch.float32)
            p_rms = torch.norm(weights_fp32, 2.0) / math.sqrt(p.numel())
        lr = self.lr
        param_scale = max(self.eps[1], p_rms)
        lr = lr * param_scale
        if self.do_weight_decay:
            weights_fp32.mul_(1.0 - lr * self.weight_decay)
        weights_fp32.add_(update, alpha=-lr)
        self._write(partition if self.zero3_enabled else p.data, weights_fp32)
