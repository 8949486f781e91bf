"""Updates into bf16 weights that keep what rounding to nearest loses: stochastic rounding, for every recipe.

bf16 keeps 8 bits of mantissa, so an update smaller than half a unit in the last place of its weight (about 2^-9 of
the weight) is rounded away when the new value is written back to nearest: a fine-tuning step is often that small
(AdamW at 2e-5 moves a weight of 0.02 by 1e-3 of itself; AdaLomo at 5e-4 by 5e-4 of its RMS), so a model trained in
bf16 weights with no fp32 master copy keeps a small part of what training computed ("stale weights", Gopher
appendix C.2). Rounded stochastically instead, up with probability (distance to the lower neighbour) / (spacing),
each weight is in expectation the value fp32 arithmetic computed and small updates add up (torchao's
`bf16_stochastic_round`, the `adamw-bf16` package), with no copy of the weights kept.

- `RoundingNoise.round_into(target, value)` writes an fp32 value into a bf16 tensor, rounded stochastically: 16
  random bits are added below bf16's mantissa, then the fp32 bit pattern is cut to bf16's (exact: the low bits are
  then zero).
- The noise comes from a generator reseeded at every step from the run's seed, the step and (where each process
  updates a shard of its own: ZeRO-3, FSDP2) the process's rank; the step count is in the optimizer's state_dict: a
  resumed run draws what the uninterrupted one would have drawn, whichever process saved the checkpoint, and DDP
  replicas, which update the same whole weights in the same order, draw the same noise and stay identical.
- The LOMO family's fused update computes each parameter's new value in fp32 already and rounds it with
  `round_into` (recipes/core/fused_backward/lomo_updates.py). An ordinary optimizer would step bf16 weights in bf16 arithmetic with
  bf16 state; `StepsEachTensor` (recipes/core/per_tensor/steps.py) steps it one tensor at a time on an fp32 copy of
  that tensor and its gradient and rounds the result into the bf16 weight. Its state is then fp32 (created from the fp32 copy, and kept fp32 when
  a checkpoint is loaded into the bf16 parameters): AdamW's moments take 8 bytes per parameter instead of 4, so
  that the moments keep their small values too; beside them, one tensor's fp32 copy, fp32 gradient and noise at a
  time.
"""

from __future__ import annotations

import torch

CHUNK = 1 << 24  # elements rounded at once: 64 MiB of noise at most


class RoundingNoise:
    """The random bits of stochastic rounding: a generator reseeded at every step from (seed, step, shard), so that
    what a checkpoint must carry is the step count alone, the same on every process."""

    def __init__(self, seed: int, shard: int, device: torch.device):
        self.seed, self.shard, self.steps = seed, shard, 0
        self.generator = torch.Generator(device=device)
        self.begin_step()  # seeded for step 0, which the first begin_step seeds again
        self.steps = 0

    def begin_step(self) -> None:
        """Before a step's (or a mode switch's) roundings: the generator for this step."""
        self.generator.manual_seed(((self.seed * 1_000_003 + self.steps) * 1_000_033 + self.shard) % (1 << 63))
        self.steps += 1

    def round_into(self, target: torch.Tensor, value: torch.Tensor) -> None:
        """target (bf16) <- value (fp32, same shape), rounded stochastically; `value` may be overwritten. DTensors
        (FSDP2) are rounded shard by shard."""
        target, value = _local(target), _local(value).contiguous()
        bits = value.view(torch.int32).view(-1)
        for start in range(0, bits.numel(), CHUNK):
            chunk = bits[start:start + CHUNK]
            noise = torch.randint(0, 1 << 16, chunk.shape, dtype=torch.int32, device=chunk.device,
                                  generator=self.generator)
            chunk.add_(noise).bitwise_and_(-65536)  # 0xFFFF0000: the bits bf16 keeps
        target.copy_(value)  # exact: every value is now a bf16 number

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]  # the next begin_step seeds the generator for the step after the checkpoint


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _trained_weight(model: torch.nn.Module) -> torch.nn.Parameter:
    return next(p for p in model.parameters() if p.requires_grad)


def rounding_noise(config, model: torch.nn.Module) -> RoundingNoise | None:
    """The run's rounding noise, or None where updates are written as they are: weights not bf16, or
    `--stochastic_rounding false` (to nearest). Seeded from --seed, and from the process's rank where each process
    updates a shard of its own (ZeRO, FSDP) rather than a whole replica (DDP: every rank draws the same)."""
    weight = _trained_weight(model)
    if weight.dtype != torch.bfloat16 or not config.train.stochastic_rounding:
        return None
    from accelerate.state import PartialState

    sharded = config.launch.kind in ("deepspeed", "fsdp")
    return RoundingNoise(config.train.seed, PartialState().process_index if sharded else 0, weight.device)


def rounding_note(config, model: torch.nn.Module) -> str:
    """The start-up line on how updates reach the weights ("" for fp32 weights)."""
    dtype = _trained_weight(model).dtype
    if dtype == torch.bfloat16:
        if config.train.stochastic_rounding:
            return "weights: bf16, each update rounded stochastically (--stochastic_rounding false: to nearest)"
        return "weights: bf16, each update rounded to nearest (--stochastic_rounding true keeps the small ones)"
    if dtype == torch.float16:
        return "weights: fp16, each update rounded to nearest (stochastic rounding is done for bf16 weights)"
    return ""
