"""Schedule-free AdamW (schedulefree.AdamWScheduleFree): iterate averaging instead of an LR schedule.

Learning rate: --learning_rate, else 1.5e-4 with --model_name_or_path (chosen from the comparison's first sweep;
schedule-free takes larger lrs than scheduled AdamW), else 2.5e-3 for the embedded tiny model trained from scratch.
How each lr fares: docs/finetune/report.md.
Supports: --warmup_steps (the optimizer's own warmup), gradient accumulation, --max_grad_norm (default 1.0),
--weight_decay on matrices only, --adam_beta1/--adam_beta2/--adam_epsilon.
(What the schedule-free family does at evaluation and under DeepSpeed follows; recipes/core/schedule_free/recipe.py.)
"""

import schedulefree
from optimizer_recipes.core.optimizers.knobs import AdamKnobs
from optimizer_recipes.core.optimizers.protocol import decay_parameter_groups, numel
from optimizer_recipes.core.run.loop import main
from optimizer_recipes.core.schedule_free.deepspeed_fixes import CountersAdvanceOncePerStep
from optimizer_recipes.core.schedule_free.fixes import FirstStepInAnyMode
from optimizer_recipes.core.schedule_free.recipe import ScheduleFreeRecipe


class AdamWScheduleFree(FirstStepInAnyMode, CountersAdvanceOncePerStep, schedulefree.AdamWScheduleFree):
    """schedulefree.AdamWScheduleFree, its counters advancing once per step under ZeRO-3 as well, its
    first step allowed in either mode (FSDP2 resumes)."""


class ScheduleFreeAdamWRecipe(ScheduleFreeRecipe):
    name = "schedule_free_adamw"
    order = 6
    trainer_optim = "schedule_free_adamw"  # the Transformers Trainer's optim= name
    default_learning_rate = 2.5e-3
    fine_tuning_learning_rate = 1.5e-4  # with --model_name_or_path: see the docstring
    knobs = AdamKnobs

    def optimizer_state_bytes(self, shapes, element_bytes):
        return sum(2 * numel(s) * element_bytes for s in shapes)  # z, exp_avg_sq

    def build(self, model, config):
        t, o = config.train, config.optim
        return AdamWScheduleFree(decay_parameter_groups(model, t.weight_decay), lr=t.learning_rate,
                                 betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon,
                                 warmup_steps=t.warmup_steps)


RECIPE = ScheduleFreeAdamWRecipe()

if __name__ == "__main__":
    main(RECIPE)
