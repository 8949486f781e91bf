"""AdaLomo (lomo_optim.AdaLomo): LOMO with Adafactor-style factored second moments, fused into backward.

The update is scaled by each parameter's RMS, so lr is relative (authors: 1e-3 or 5e-4 when fine-tuning).
Built as LinearTimeAdaLomo (recipes/core/fused_backward/lomo_updates.py): lomo-optim's update, bit for bit, in one hook per
parameter (lomo-optim's hooks each scan every parameter), with its state on the model's device (lomo-optim 0.1.1
puts it on CUDA unconditionally, which fails on CPU) and in the checkpoint.
Learning rate: --learning_rate, else 5e-4 with --model_name_or_path (the AdaLomo authors recommend 1e-3 or 5e-4),
else 1e-1 for the embedded tiny model trained from scratch. How each lr fares: docs/finetune/report.md.
Supports: every LR schedule with --warmup_steps, --weight_decay, --clip_grad_value, --loss_scale (static, default
1024; lower it if losses go NaN), --max_grad_norm (a second backward pass, so off by default), gradient
checkpointing, --bf16.
(What the LOMO family runs under and refuses follows; recipes/core/fused_backward/recipe.py.)
"""

from dataclasses import dataclass, field

from optimizer_recipes.core.fused_backward.lomo_updates import LinearTimeAdaLomo
from optimizer_recipes.core.fused_backward.recipe import FusedBackwardRecipe
from optimizer_recipes.core.optimizers.protocol import factored_numel, largest_numel
from optimizer_recipes.core.run.loop import main
from optimizer_recipes.lomo import LomoKnobs


@dataclass
class AdaLomoKnobs(LomoKnobs):
    loss_scale: float = field(default=2.0**10, metadata={"help": "AdaLomo's static loss scale."})


class AdaLomoRecipe(FusedBackwardRecipe):
    name = "adalomo"
    order = 5
    trainer_optim = "adalomo"  # the Transformers Trainer's optim= name
    compared_with = "adafactor"  # the optimizer with the same state: factored second moments
    default_learning_rate = 1e-1  # a from-scratch tiny model has small weights; use 1e-3..5e-4 for fine-tuning
    fine_tuning_learning_rate = 5e-4  # with --model_name_or_path: see the docstring
    knobs = AdaLomoKnobs

    def optimizer_state_bytes(self, shapes, element_bytes):
        return sum(factored_numel(s) for s in shapes) * 4  # fp32 row/column second moments

    def update_bytes(self, shapes, element_bytes):
        # the largest parameter's fp32 gradient (a copy for 16-bit weights) and update, or update and weights
        # (measured: tests/test_lomo_updates.py); a 16-bit gradient is freed once upcast
        return largest_numel(shapes) * (8 - element_bytes)

    def build_fused(self, model, config):
        t, o = config.train, config.optim
        return LinearTimeAdaLomo(model, lr=t.learning_rate, loss_scale=o.loss_scale,
                                 clip_grad_norm=t.max_grad_norm or None, clip_grad_value=o.clip_grad_value,
                                 weight_decay=t.weight_decay)


RECIPE = AdaLomoRecipe()

if __name__ == "__main__":
    main(RECIPE)
