"""Adafactor (transformers.optimization.Adafactor) with an external learning rate, as the Transformers Trainer uses it.

Factored second moments: state is a row and a column vector per matrix, not a full-size tensor.
Learning rate: --learning_rate, else 6e-5 with --model_name_or_path (chosen from the comparison's first sweep; the relative
step is off, so the lr is absolute), else 3e-3 for the embedded tiny model trained from scratch. How each lr fares:
docs/finetune/report.md.
Supports: every LR schedule with --warmup_steps, gradient accumulation, --max_grad_norm (default 1.0),
--weight_decay on matrices only.
Refuses: DeepSpeed ZeRO (its flat partitions have no rows and columns to factor) and FSDP (its sharded matrices
meet Adafactor's plain-tensor factored state).
Built with relative_step=False, scale_parameter=False, warmup_init=False, so --learning_rate and
--lr_scheduler_type drive it (Adafactor's own relative-step schedule is off).
"""

from optimizer_recipes.core.optimizers.protocol import (
    OptimizerRecipe,
    decay_parameter_groups,
    factored_numel,
    refuse_flattened_partitions,
    refuse_sharded_tensors,
)
from optimizer_recipes.core.run.loop import main
from transformers.optimization import Adafactor


class AdafactorRecipe(OptimizerRecipe):
    name = "adafactor"
    order = 2
    trainer_optim = "adafactor"  # the Transformers Trainer's optim= name
    default_learning_rate = 3e-3
    fine_tuning_learning_rate = 6e-5  # with --model_name_or_path: see the docstring

    def refuse(self, config):
        return refuse_sharded_tensors(
            self, config, "each process holds a shard of every matrix (a DTensor under FSDP2), and transformers' "
            "Adafactor builds its row and column moments as plain tensors, so its first step fails") or \
            refuse_flattened_partitions(
            self, config, "Adafactor factors the second moment of each matrix into a row and a column",
            instead="multi_gpu.yaml")

    def optimizer_state_bytes(self, shapes, element_bytes):
        return sum(factored_numel(s) for s in shapes) * element_bytes  # no first moment (beta1=None)

    def build(self, model, config):
        t = config.train
        return Adafactor(decay_parameter_groups(model, t.weight_decay), lr=t.learning_rate,
                         relative_step=False, scale_parameter=False, warmup_init=False)


RECIPE = AdafactorRecipe()

if __name__ == "__main__":
    main(RECIPE)
