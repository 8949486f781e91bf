"""An optimizer stepped one tensor at a time: after backward, or inside it as each gradient arrives.

Two features need an ordinary torch optimizer to update one parameter alone:
- bf16 weights with stochastic rounding (recipes/core/per_tensor/stochastic_rounding.py): each tensor steps as an fp32 stand-in
  (an fp32 copy of it and of its gradient, carrying its state) and the result is rounded stochastically into the
  bf16 weight;
- updates in backward (`--optimizer_in_backward true`, recipes/core/per_tensor/in_backward.py): each parameter steps in a
  post-accumulate-grad hook as soon as its gradient is complete (averaged across processes first, under DDP), and
  its gradient is freed at once, so that one gradient is alive at a time instead of all of them: LOMO's idea, for any
  optimizer whose update is per tensor (PyTorch's "optimizer step in backward" tutorial; torchtune's
  `optimizer_in_bwd`).

`StepsEachTensor` is that one mechanism. For each parameter it empties every group but the parameter's own, which
holds the parameter alone (as DeepSpeed ZeRO-3 steps sub-groups), with its position among its group's in
`group["tensor_position"]` for an optimizer whose update depends on it (GrokAdamW), and calls the optimizer's step.
The groups' numbers (optimi's step counter, schedule-free's k and train_mode) advance once per step, as in one call
over all tensors: each tensor's call starts from the numbers its group had when the step began. The learning rate
the schedule set for the step is the group's, so it reaches every tensor's update. Stepping one tensor at a time
changes no recipe's arithmetic (tests/test_stochastic_rounding.py, tests/test_in_backward.py: bit for bit).
"""

from __future__ import annotations

import torch
from optimizer_recipes.core.per_tensor.stochastic_rounding import RoundingNoise


def _numbers(group: dict) -> dict:
    """A group's numbers, scalar tensors copied (optimi's step counter is a tensor it increments in place)."""
    return {key: value.clone() if torch.is_tensor(value) else value for key, value in group.items()
            if isinstance(value, (bool, int, float)) or (torch.is_tensor(value) and value.dim() == 0)}


class StepsEachTensor(torch.optim.Optimizer):
    """`optimizer`, stepped one tensor at a time: in fp32 with its result rounded stochastically into bf16 weights
    when `noise` is given, and inside backward when `in_backward` (hooks on the parameters, `attach()`ed after the
    launch's wrappers have made the parameters they train)."""

    def __init__(self, optimizer: torch.optim.Optimizer, noise: RoundingNoise | None = None,
                 in_backward: bool = False, max_norm_per_tensor: float = 0.0):
        self.optimizer = optimizer
        self.noise = noise
        self.in_backward = in_backward
        self.max_norm_per_tensor = max_norm_per_tensor  # in backward: each gradient clipped alone before its update
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._hooks: list = []
        self._step_began: list[dict] | None = None  # the groups' numbers when the step in progress began

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups):
        self.optimizer.param_groups = groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # --- in backward --------------------------------------------------------------------------------------------

    def attach(self) -> None:
        """Step each parameter the optimizer holds (as it holds them now: after DDP or FSDP2 prepared the model) in
        a post-accumulate-grad hook, and free its gradient."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for index, group in enumerate(self.optimizer.param_groups):
            for position, p in enumerate(group["params"]):
                self._hooks.append(p.register_post_accumulate_grad_hook(
                    lambda p, index=index, position=position: self._step_in_backward(p, index, position)))

    @torch.no_grad()
    def _step_in_backward(self, p: torch.Tensor, index: int, position: int) -> None:
        if self._step_began is None:  # the step's first gradient
            self._begin_step()
        if self.max_norm_per_tensor > 0:
            torch.nn.utils.clip_grad_norm_([p], self.max_norm_per_tensor)
        self._step_one(p, index, position, self.optimizer.step)
        p.grad = None

    # --- after backward -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """Step each tensor that holds a gradient. In backward every gradient was consumed and freed by its hook,
        so after a backward this only ends the step (the next gradient begins the next); a step given gradients
        from elsewhere (the zero-gradient step with which torch's distributed checkpoint loader creates the state
        it loads into, under FSDP2) steps them."""
        if closure is not None:
            raise ValueError("stepping one tensor at a time takes no closure")
        if self.in_backward and not any(p.grad is not None for g in self.optimizer.param_groups for p in g["params"]):
            self._step_began = None
            return None
        if self.noise is not None and not self._holds_bf16():  # e.g. DeepSpeed's fp32 master partitions
            return self.optimizer.step()
        self._each_tensor(self.optimizer.step, with_gradient=True)

    @torch.no_grad()
    def switch_mode(self, mode: str) -> None:
        """Schedule-free's train() or eval(), which move the weights between y and x: one tensor at a time where
        the result is rounded into bf16 weights, else in one call."""
        if self.noise is None or not self._holds_bf16():
            return getattr(self.optimizer, mode)()
        self._each_tensor(getattr(self.optimizer, mode), with_gradient=False)

    def _holds_bf16(self) -> bool:
        return any(p.dtype == torch.bfloat16 for group in self.optimizer.param_groups for p in group["params"])

    def _each_tensor(self, call, with_gradient: bool) -> None:
        self._begin_step()
        try:
            for index, group in enumerate(self.optimizer.param_groups):
                for position, p in enumerate([q for q in group["params"] if q.grad is not None or not with_gradient]):
                    self._step_one(p, index, position, call)
        finally:
            self._step_began = None

    # --- one tensor ---------------------------------------------------------------------------------------------

    def _begin_step(self) -> None:
        self._step_began = [_numbers(group) for group in self.optimizer.param_groups]
        if self.noise is not None:
            self.noise.begin_step()  # this step's rounding noise

    def _step_one(self, p: torch.Tensor, index: int, position: int, call) -> None:
        """`call()` with p alone in its group (an fp32 stand-in carrying p's state when its result is rounded),
        from the numbers its group had when the step began; the other groups are left as they were."""
        groups = self.optimizer.param_groups
        everyone = [group["params"] for group in groups]
        target = p
        if self.noise is not None and p.dtype == torch.bfloat16:  # p itself is not touched: hooks are on it
            target = torch.nn.Parameter(p.detach().float())
            target.grad = None if p.grad is None else p.grad.detach().float()
        emptied = {other: _numbers(group) for other, group in enumerate(groups) if other != index}
        for other, group in enumerate(groups):
            group["params"] = [target] if other == index else []
        groups[index].update(_numbers(self._step_began[index]))  # copies: the call may add to them in place
        groups[index]["tensor_position"] = position
        state = self.optimizer.state
        if target is not p and p in state:
            state[target] = state.pop(p)
        try:
            call()
            if target is not p:
                self.noise.round_into(p.detach(), target.detach())
        finally:
            if target is not p and target in state:
                state[p] = state.pop(target)
            for other, before in emptied.items():
                groups[other].update(before)
            for group, params in zip(groups, everyone):
                group["params"] = params
            groups[index].pop("tensor_position", None)

    # --- checkpoints ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        noise = {"stochastic_rounding": self.noise.state_dict()} if self.noise is not None else {}
        return {**self.optimizer.state_dict(), **noise}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        if self.noise is not None:
            self.noise.load_state_dict(state_dict.pop("stochastic_rounding"))
        self.optimizer.load_state_dict(state_dict)
        if self.noise is None:
            return
        # torch casts loaded state to its parameter's dtype (bf16 here): put back the fp32 it was saved in
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for index, saved in state_dict.get("state", {}).items():
            if not isinstance(index, int) or index >= len(params):
                continue
            live = self.optimizer.state.get(params[index], {})
            for key, value in saved.items():
                if (torch.is_tensor(value) and value.is_floating_point() and torch.is_tensor(live.get(key))
                        and live[key].dtype != value.dtype):
                    live[key] = value.to(live[key].device)
