"""GrokAdamW (grokadamw.GrokAdamW): AdamW plus an EMA of gradients, amplified by lamb, for slow-varying gradients.

Learning rate: --learning_rate, else 6e-5 with --model_name_or_path (chosen from the comparison's sweep), else 1e-3
for the embedded tiny model trained from scratch. How each lr fares: docs/finetune/report.md.
Supports: every LR schedule with --warmup_steps, gradient accumulation, --max_grad_norm (default 1.0; GrokAdamW
also clips each tensor to norm 1.0 itself), --weight_decay on matrices only, --adam_beta1/--adam_beta2/--adam_epsilon,
--grokadamw_alpha_init, --grokadamw_lamb, --grokadamw_gamma (per-position momentum decay).
Refuses: DeepSpeed ZeRO (its flat partitions erase the per-tensor clipping and momentum decay), an unknown
--grokadamw_signal, and eval_train_gap without --eval_steps.
Grokking signal (--grokadamw_signal): GrokAdamW decays its gradient EMA by alpha = alpha_init * exp(-rate * signal)
(--grokadamw_signal_decay_rate, default 0.1). Upstream nothing feeds the signal (the Transformers Trainer neither), so
by default (off) alpha stays at alpha_init. With eval_train_gap the recipe gives GrokAdamW the losses its own default
signal reads: after each evaluation (--eval_steps, required) the mean training loss since the previous one and the
evaluation loss, so signal = max(0, eval - train) / max(eval, train), alike on every rank; a wider gap shortens the
EMA. The signal and alpha are logged with each evaluation (grokking_signal, grokadamw_alpha) and kept in the
optimizer's checkpoint, so a resumed run goes on with the same alpha.
Built through GrokAdamWWithCheckpointableState (below): grokadamw 0.1.2 keys its moments
by Parameter object, so they would not survive a checkpoint.
Memory: 3 state tensors per parameter, kept on the CPU by grokadamw 0.1.2.
"""

import functools
import math
from dataclasses import dataclass, field

import torch
from optimizer_recipes.core.optimizers.knobs import AdamKnobs
from optimizer_recipes.core.optimizers.protocol import (
    OptimizerRecipe,
    decay_parameter_groups,
    numel,
    refuse_flattened_partitions,
)
from optimizer_recipes.core.optimizers.wrappers import unwrap_optimizer
from optimizer_recipes.core.run.loop import main


@dataclass
class GrokAdamWKnobs(AdamKnobs):
    grokadamw_alpha_init: float = field(default=0.98, metadata={"help": "GrokAdamW: EMA decay of the gradient."})
    grokadamw_lamb: float = field(default=2.0, metadata={"help": "GrokAdamW: weight of the gradient's EMA added to it."})
    grokadamw_gamma: float = field(default=0.1, metadata={"help": "GrokAdamW: per-position momentum decay."})
    grokadamw_signal: str = field(
        default="off", metadata={"help": "GrokAdamW's grokking signal: off (upstream's default: the EMA decay stays "
                                          "at alpha_init) or eval_train_gap (relative gap of evaluation over training "
                                          "loss, refreshed at each --eval_steps evaluation)."})
    grokadamw_signal_decay_rate: float = field(
        default=0.1, metadata={"help": "GrokAdamW: alpha = alpha_init * exp(-rate * signal)."})


class GrokAdamWRecipe(OptimizerRecipe):
    name = "grokadamw"
    order = 3
    trainer_optim = "grokadamw"  # the Transformers Trainer's optim= name
    default_learning_rate = 1e-3
    fine_tuning_learning_rate = 6e-5  # with --model_name_or_path: see the docstring
    knobs = GrokAdamWKnobs
    signals = ("off", "eval_train_gap")

    def refuse(self, config):
        signal = config.optim.grokadamw_signal
        if signal not in self.signals:
            return f"--grokadamw_signal {signal}: choose one of {', '.join(self.signals)}"
        if signal == "eval_train_gap" and not config.train.eval_steps:
            return ("--grokadamw_signal eval_train_gap is refreshed at each evaluation during training: set "
                    "--eval_steps (e.g. 100)")
        return refuse_flattened_partitions(
            self, config, "GrokAdamW clips each tensor and decays momentum by each tensor's position")

    def after_evaluation(self, optimizer, config, train_loss, eval_loss):
        o = config.optim
        if o.grokadamw_signal == "off":
            return {}
        grokadamw = unwrap_optimizer(optimizer)
        for group in grokadamw.param_groups:  # what GrokAdamW's own default signal reads (no signal function set)
            group["train_loss"], group["eval_loss"] = train_loss, eval_loss
        signal = grokadamw._compute_grokking_signal(grokadamw.param_groups[0])  # what its next step will use
        return {"grokking_signal": signal,
                "grokadamw_alpha": o.grokadamw_alpha_init * math.exp(-o.grokadamw_signal_decay_rate * signal)}

    def optimizer_state_bytes(self, shapes, element_bytes):
        return sum(3 * numel(s) * element_bytes for s in shapes)  # exp_avg, exp_avg_sq, grok_ema (host memory)

    def build(self, model, config):
        t, o = config.train, config.optim
        return grokadamw_with_checkpointable_state()(decay_parameter_groups(model, t.weight_decay), lr=t.learning_rate,
                         betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon, alpha_init=o.grokadamw_alpha_init,
                         lamb=o.grokadamw_lamb, gamma=o.grokadamw_gamma,
                         grokking_signal_decay_rate=o.grokadamw_signal_decay_rate)


@functools.cache
def grokadamw_with_checkpointable_state() -> type:
    """A thin fix over grokadamw 0.1.2, tested in tests/test_grokking.py (against upstream) and by exact resume of
    this recipe (tests/test_resume.py, and under DDP and FSDP2 in tests/test_distributed.py). Imported here, after
    `optimizer_recipes` is: run as a script, this file would otherwise shadow the grokadamw package."""
    from grokadamw import GrokAdamW

    class GrokAdamWWithCheckpointableState(GrokAdamW):
        """GrokAdamW whose moments are torch's optimizer state (`self.state`).

        grokadamw 0.1.2 keeps its moments in param_groups[i]["state"], a dict keyed by Parameter objects, beside an
        empty `Optimizer.state`:
        - state_dict() saves them keyed by copies of the old parameters, which load_state_dict() cannot match to the
          new ones, so a resume silently restarts every moment;
        - under FSDP2 torch's distributed checkpointing (what accelerate saves and loads FSDP optimizers with) finds
          `optimizer.state` empty and "initializes" it with a zero-gradient step at every save, which decays every
          moment once per checkpoint (measured: a 2-process run's loss 2e-3 away from one process's after a
          checkpoint), and cannot load the state back.
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

    return GrokAdamWWithCheckpointableState


RECIPE = GrokAdamWRecipe()

if __name__ == "__main__":
    main(RECIPE)
