"""GrokAdamW (grokadamw.GrokAdamW): AdamW plus an EMA of gradients, amplified by lamb, for slow-varying gradients.

Learning rate: --learning_rate, else 2e-5 with --model_name_or_path (AdamW's (GrokAdamW is AdamW on EMA-amplified
gradients); conservative), else 1e-3 for the embedded tiny model trained from scratch.
Supports: every LR schedule with --warmup_steps, gradient accumulation, --max_grad_norm (default 1.0; GrokAdamW
also clips each tensor to norm 1.0 itself), --weight_decay on matrices only, --adam_beta1/--adam_beta2/--adam_epsilon,
--grokadamw_alpha_init, --grokadamw_lamb, --grokadamw_gamma (per-position momentum decay).
Refuses: DeepSpeed ZeRO (its flat partitions erase the per-tensor clipping and momentum decay).
Built through GrokAdamWWithCheckpointableState (recipes/core/grokadamw_fixes.py): grokadamw 0.1.2 keys its moments
by Parameter object, so they would not survive a checkpoint. No grokking signal function is set (as in the
Transformers Trainer), so the EMA decay stays at alpha_init.
Memory: 3 state tensors per parameter, kept on the CPU by grokadamw 0.1.2.
"""

from recipes.core.loop import main
from recipes.core.optimizer_recipe import (OptimizerRecipe, decay_parameter_groups, numel,
                                           refuse_flattened_partitions)


class GrokAdamWRecipe(OptimizerRecipe):
    name = "grokadamw"
    default_learning_rate = 1e-3
    fine_tuning_learning_rate = 2e-5  # with --model_name_or_path: see the docstring
    reads_flags = ("adam_beta1", "adam_beta2", "adam_epsilon", "grokadamw_alpha_init", "grokadamw_lamb",
                   "grokadamw_gamma")

    def refuse(self, config):
        return refuse_flattened_partitions(
            self, config, "GrokAdamW clips each tensor and decays momentum by each tensor's position")

    def optimizer_state_bytes(self, shapes, element_bytes):
        return sum(3 * numel(s) * element_bytes for s in shapes)  # exp_avg, exp_avg_sq, grok_ema (host memory)

    def build(self, model, config):
        # Imported here, after `recipes` is: run as a script, this file would otherwise shadow the package.
        from recipes.core.grokadamw_fixes import GrokAdamWWithCheckpointableState

        t, o = config.train, config.optim
        return GrokAdamWWithCheckpointableState(decay_parameter_groups(model, t.weight_decay), lr=t.learning_rate,
                         betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon, alpha_init=o.grokadamw_alpha_init,
                         lamb=o.grokadamw_lamb, gamma=o.grokadamw_gamma)


RECIPE = GrokAdamWRecipe()

if __name__ == "__main__":
    main(RECIPE)
