"""LOMO (lomo_optim.Lomo): SGD fused into backward, so no gradient tensors and no optimizer state are kept.

Each parameter is updated by a hook as its gradient arrives, at the scheduled lr of the step
(optimizer.fused_backward(loss, lr)); there is no optimizer.step(). Built as LinearTimeLomo
(recipes/core/fused_backward/lomo_updates.py): lomo-optim's update, bit for bit, in one hook per parameter (lomo-optim's hooks
each scan every parameter, a cost that grows with the square of the tensor count), 16-bit weights upcast in chunks.
Learning rate: --learning_rate, else 1e-2 with --model_name_or_path (a third of the LOMO authors' 3e-2
(config/args_lomo.yaml), which they pair with clip_grad_norm 1.0, off here by default; chosen from the comparison's
sweep, which also runs the authors' setting), else 0.5 for the embedded tiny model trained from scratch. How each lr
fares: docs/finetune/report.md.
Supports: every LR schedule with --warmup_steps, --weight_decay, --clip_grad_value, --max_grad_norm (LOMO's
clip_grad_norm: costs a second backward pass, so off by default), gradient checkpointing, --bf16.
(What the LOMO family runs under and refuses follows; recipes/core/fused_backward/recipe.py.)
"""

from dataclasses import dataclass, field
from typing import Optional

from optimizer_recipes.core.fused_backward import lomo_updates
from optimizer_recipes.core.fused_backward.recipe import FusedBackwardRecipe
from optimizer_recipes.core.optimizers.protocol import largest_numel
from optimizer_recipes.core.run.loop import main


@dataclass
class LomoKnobs:
    clip_grad_value: Optional[float] = field(default=None, metadata={"help": "LOMO/AdaLomo: clamp each gradient."})


class LomoRecipe(FusedBackwardRecipe):
    name = "lomo"
    order = 4
    trainer_optim = "lomo"  # the Transformers Trainer's optim= name
    compared_with = "schedule_free_sgd"  # the optimizer with the same state: plain SGD's step
    default_learning_rate = 0.5  # plain SGD on the from-scratch tiny model; tune it for a pretrained LLM
    fine_tuning_learning_rate = 1e-2  # with --model_name_or_path: see the docstring
    knobs = LomoKnobs
    source_settings = (("the LOMO authors' lr 3e-2 with clip_grad_norm 1.0 (config/args_lomo.yaml)", 3e-2,
                        ("--max_grad_norm", "1.0")),)

    def optimizer_state_bytes(self, shapes, element_bytes):
        return 0  # plain SGD in backward: no state

    def update_bytes(self, shapes, element_bytes):
        # a 16-bit gradient and parameter are upcast to fp32 a chunk at a time (measured: tests/test_lomo_updates.py)
        return 0 if element_bytes == 4 else 8 * min(largest_numel(shapes), lomo_updates.UPDATE_CHUNK)

    def build_fused(self, model, config):
        t, o = config.train, config.optim
        return lomo_updates.LinearTimeLomo(model, lr=t.learning_rate, clip_grad_norm=t.max_grad_norm or None,
                                           clip_grad_value=o.clip_grad_value, weight_decay=t.weight_decay)


RECIPE = LomoRecipe()

if __name__ == "__main__":
    main(RECIPE)
