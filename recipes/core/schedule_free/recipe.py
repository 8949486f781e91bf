"""The schedule-free family's protocol: y while training, x (the average) when evaluated or saved."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from optimizer_recipes.core.optimizers.protocol import OptimizerRecipe
from optimizer_recipes.core.schedule_free.deepspeed_fixes import switch_mode

if TYPE_CHECKING:
    from optimizer_recipes.core.run.config import Config


class ScheduleFreeRecipe(OptimizerRecipe):
    """Schedule-free: evaluate and save at x, train at y; warmup inside the optimizer, LR schedule constant.

    Build the optimizer from a class that mixes in `deepspeed_fixes.CountersAdvanceOncePerStep` (ZeRO-3 steps it
    once per sub-group); mode switches go through `deepspeed_fixes.switch_mode`, which also moves DeepSpeed's
    master copy and the module weights.
    """

    family_notes = (
        "Weights are y while training and x (the average) when evaluated or saved: the loop calls eval() before "
        "every\nevaluation and save, so the saved model is x, and train() before training resumes.\n"
        "Under DeepSpeed ZeRO the switches run on DeepSpeed's master copy and are copied into the module weights, so "
        "x is\nevaluated and saved there too, and under ZeRO-3 (which steps the optimizer once per parameter "
        "sub-group) its step\ncounters advance once per step (recipes/core/schedule_free/deepspeed_fixes.py).\n"
        "Refuses: any --lr_scheduler_type but constant (a schedule would stack on its own).\n")

    default_lr_scheduler_type = "constant"

    def refuse(self, config: Config) -> Optional[str]:
        if config.train.lr_scheduler_type != "constant":
            return (f"{self.name} replaces the LR schedule with iterate averaging, so --lr_scheduler_type "
                    f"{config.train.lr_scheduler_type} would stack a second schedule on it; use --lr_scheduler_type "
                    "constant (its warmup comes from --warmup_steps)")
        return None

    def scheduler_warmup_steps(self, config: Config) -> int:
        return 0  # --warmup_steps goes to the optimizer's own warmup

    def train_mode(self, optimizer) -> None:
        switch_mode(optimizer, "train")

    def eval_mode(self, optimizer) -> None:
        switch_mode(optimizer, "eval")  # x is what is evaluated and saved
