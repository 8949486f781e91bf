"""AdamW (torch.optim.AdamW): the baseline every other recipe is measured against.

Learning rate: --learning_rate, else 2e-5 with --model_name_or_path (TRL's SFTConfig default for full fine-tuning),
else 1e-3 for the embedded tiny model trained from scratch. How each lr fares (short runs on small models want
more): docs/finetune/report.md.
Supports: every LR schedule with --warmup_steps, gradient accumulation, --max_grad_norm clipping (default 1.0),
--weight_decay on matrices only, --adam_beta1/--adam_beta2/--adam_epsilon.
Refuses: nothing. Memory: parameters + gradients + 2 fp32 moments per parameter.
Under ZeRO-3 optimizer offload torch's AdamW steps on the CPU, not DeepSpeed's faster CPU Adam, whose offload
checkpoints do not resume exactly (docs/distributed.md).
"""

import torch
from optimizer_recipes.core.optimizers.knobs import AdamKnobs
from optimizer_recipes.core.optimizers.protocol import OptimizerRecipe, decay_parameter_groups, numel
from optimizer_recipes.core.run.loop import main


class AdamWRecipe(OptimizerRecipe):
    name = "adamw"
    order = 1
    trainer_optim = "adamw_torch"  # the Transformers Trainer's optim= name
    is_reference = True  # what the other recipes' memory and step time are compared with
    default_learning_rate = 1e-3
    fine_tuning_learning_rate = 2e-5  # with --model_name_or_path: see the docstring
    knobs = AdamKnobs

    def optimizer_state_bytes(self, shapes, element_bytes):
        return sum(2 * numel(s) * element_bytes + 4 for s in shapes)  # exp_avg, exp_avg_sq, fp32 step

    def build(self, model, config):
        t, o = config.train, config.optim
        return torch.optim.AdamW(decay_parameter_groups(model, t.weight_decay), lr=t.learning_rate,
                                 betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon)


RECIPE = AdamWRecipe()

if __name__ == "__main__":
    main(RECIPE)
