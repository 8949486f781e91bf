"""Schedule-free SGD (schedulefree.SGDScheduleFree): momentum SGD with iterate averaging instead of an LR schedule.

Learning rate: --learning_rate, else 3e-2 with --model_name_or_path (what LOMO's authors use for plain SGD), else
1.0 for the embedded tiny model trained from scratch. How each lr fares: docs/finetune/report.md.
Supports: --warmup_steps (the optimizer's own warmup), gradient accumulation, --max_grad_norm (default 1.0),
--weight_decay on matrices only, --sgd_momentum.
(What the schedule-free family does at evaluation and under DeepSpeed follows; recipes/core/schedule_free/recipe.py.)
"""

from dataclasses import dataclass, field

import schedulefree
from optimizer_recipes.core.optimizers.protocol import decay_parameter_groups, numel
from optimizer_recipes.core.run.loop import main
from optimizer_recipes.core.schedule_free.deepspeed_fixes import CountersAdvanceOncePerStep
from optimizer_recipes.core.schedule_free.fixes import FirstStepInAnyMode
from optimizer_recipes.core.schedule_free.recipe import ScheduleFreeRecipe


class SGDScheduleFree(FirstStepInAnyMode, CountersAdvanceOncePerStep, schedulefree.SGDScheduleFree):
    """schedulefree.SGDScheduleFree, its counters advancing once per step under ZeRO-3 as well, its
    first step allowed in either mode (FSDP2 resumes)."""


@dataclass
class ScheduleFreeSGDKnobs:
    sgd_momentum: float = field(default=0.9, metadata={"help": "Schedule-free SGD momentum."})


class ScheduleFreeSGDRecipe(ScheduleFreeRecipe):
    name = "schedule_free_sgd"
    order = 7
    trainer_optim = "schedule_free_sgd"  # the Transformers Trainer's optim= name
    default_learning_rate = 1.0
    fine_tuning_learning_rate = 3e-2  # with --model_name_or_path: see the docstring
    knobs = ScheduleFreeSGDKnobs

    def optimizer_state_bytes(self, shapes, element_bytes):
        return sum(numel(s) * element_bytes for s in shapes)  # z

    def build(self, model, config):
        t, o = config.train, config.optim
        return SGDScheduleFree(decay_parameter_groups(model, t.weight_decay), lr=t.learning_rate,
                               momentum=o.sgd_momentum, warmup_steps=t.warmup_steps)


RECIPE = ScheduleFreeSGDRecipe()

if __name__ == "__main__":
    main(RECIPE)
