"""StableAdamW (optimi.StableAdamW, torch-optimi): AdamW with AdaFactor's update clipping, per tensor.

Each tensor's learning rate is divided by max(1, RMS(g^2 / v)), so a step never moves a tensor further than Adam's
steady state would: no gradient-norm clipping is needed (default --max_grad_norm 0, as its authors run it; set it
to clip as well). Weight decay is decoupled and scaled by the lr, as torch AdamW's (decouple_lr off). Betas and
epsilon are the TrainingArguments flags (0.9, 0.999, 1e-8), as the Transformers Trainer passes them for
optim="stable_adamw". With 16-bit weights and no fp32 master copy (--dtype bfloat16 without --bf16), optimi adds
Kahan summation (one more 16-bit buffer per parameter) so small updates are not rounded away.
Learning rate: --learning_rate, else 2e-5 with --model_name_or_path (the adamw recipe's), else 1e-3 for the
embedded tiny model trained from scratch. How each lr fares: docs/finetune/report.md.
Supports: every LR schedule with --warmup_steps, gradient accumulation, --max_grad_norm, --weight_decay on
matrices only, --adam_beta1/--adam_beta2/--adam_epsilon, DDP and FSDP2.
Refuses: DeepSpeed ZeRO (its flat partitions would clip one partition of many tensors, not each tensor).
Install: pip install -e ".[optimi]".
"""

from optimizer_recipes.core.optimizers.knobs import AdamKnobs
from optimizer_recipes.core.optimizers.protocol import (
    OptimizerRecipe,
    decay_parameter_groups,
    numel,
    refuse_flattened_partitions,
)
from optimizer_recipes.core.run.loop import main


class StableAdamWRecipe(OptimizerRecipe):
    name = "stable_adamw"
    order = 12
    trainer_optim = "stable_adamw"  # the Transformers Trainer's optim= name
    default_learning_rate = 1e-3
    fine_tuning_learning_rate = 2e-5
    default_max_grad_norm = 0.0  # the update clipping bounds each tensor's step
    knobs = AdamKnobs
    requires = ("optimi", '-e ".[optimi]" (or: pip install torch-optimi)')

    def refuse(self, config):
        return refuse_flattened_partitions(self, config, "StableAdamW clips each tensor's update by its own RMS")

    def optimizer_state_bytes(self, shapes, element_bytes):
        # exp_avg, exp_avg_sq and eps^2 in the weights' dtype; with 16-bit weights a Kahan compensation buffer too
        moments = 2 if element_bytes == 4 else 3
        return sum(moments * numel(s) * element_bytes + element_bytes for s in shapes)

    def build(self, model, config):
        from optimi import StableAdamW

        t, o = config.train, config.optim
        return StableAdamW(decay_parameter_groups(model, t.weight_decay), lr=t.learning_rate,
                           betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon, weight_decay=t.weight_decay,
                           decouple_lr=False)


RECIPE = StableAdamWRecipe()

if __name__ == "__main__":
    main(RECIPE)
