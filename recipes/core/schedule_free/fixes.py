"""A thin fix over schedulefree 1.4 under FSDP2 (the DeepSpeed ones are in deepspeed_fixes.py), tested in
tests/test_optimizer_protocols.py against upstream and by the resumed FSDP2 runs of tests/test_distributed.py."""

from __future__ import annotations


class FirstStepInAnyMode:
    """Mixin before a schedule-free optimizer class: a step taken before the optimizer holds any state runs in train
    mode, whatever mode it is in.

    torch's distributed checkpointing, which accelerate loads FSDP2 optimizers with, builds the state of a fresh
    optimizer by a zero-gradient step at lr 0 before loading the checkpoint into it; schedule-free refuses any step in
    eval mode, which a fresh optimizer is in, so every FSDP2 resume failed ("Optimizer was not in train mode").
    With no state yet there is nothing to move between y and x: train() would only set the flag, so the step runs
    with the flag set and the flag goes back. Once the parameters stepped hold state, upstream's check applies
    unchanged (the parameters of this call: stepped one tensor at a time, each tensor's first step is such a step).
    """

    def step(self, closure=None):
        modes = [group["train_mode"] for group in self.param_groups]
        if all(modes) or any(p in self.state for group in self.param_groups for p in group["params"]):
            return super().step(closure)
        for group in self.param_groups:
            group["train_mode"] = True
        try:
            return super().step(closure)
        finally:
            for group, mode in zip(self.param_groups, modes):
                group["train_mode"] = mode
