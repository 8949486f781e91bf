"""A thin fix over grokadamw 0.1.2, tested in tests/test_grokking.py (against upstream) and by exact resume of the
grokadamw recipe (tests/test_resume.py, and under DDP and FSDP2 in tests/test_distributed.py)."""

from __future__ import annotations

import torch
from grokadamw import GrokAdamW


class GrokAdamWWithCheckpointableState(GrokAdamW):
    """GrokAdamW whose moments are torch's optimizer state (`self.state`).

    grokadamw 0.1.2 keeps its moments in param_groups[i]["state"], a dict keyed by Parameter objects, beside an empty
    `Optimizer.state`:
    - state_dict() saves them keyed by copies of the old parameters, which load_state_dict() cannot match to the new
      ones, so a resume silently restarts every moment;
    - under FSDP2 torch's distributed checkpointing (what accelerate saves and loads FSDP optimizers with) finds
      `optimizer.state` empty and "initializes" it with a zero-gradient step at every save, which decays every moment
      once per checkpoint (measured: a 2-process run's loss 2e-3 away from one process's after a checkpoint), and
      cannot load the state back.
    Here every group's "state" is `self.state` itself: upstream's update reads and writes it unchanged, and torch
    saves, loads and shards it as any optimizer's state (by parameter index, or by name under FSDP2).
    """


    def step(self, closure=None):
        for group in self.param_groups:
            group["state"] = self.state
        return super().step(closure)

    def _update_group(self, group, params, grads, grokking_signal):
        """Upstream's update, with each parameter at its position in the group when one is stepped alone.

        GrokAdamW decays momentum by a parameter's position among its group's (beta1 x (1 - gamma)^i, i counted by
        upstream over the tensors it is given). Stepped one tensor at a time (bf16 weights with stochastic rounding,
        recipes/core/per_tensor/steps.py: `group["tensor_position"]`), the tensor comes after as many empty
        stand-ins, so that it gets its own i; their throwaway state is dropped."""
        position = group.get("tensor_position", 0)
        stand_ins = [torch.zeros(0, device=params[0].device) for _ in range(position)] if params else []
        try:
            GrokAdamW._update_group(group, stand_ins + list(params), stand_ins + list(grads), grokking_signal)
        finally:
            for stand_in in stand_ins:
                self.state.pop(stand_in, None)

    def state_dict(self) -> dict:
        packed = super().state_dict()
        for group in packed["param_groups"]:
            group.pop("state", None)  # the same moments as packed["state"], keyed by Parameter objects
        return packed
