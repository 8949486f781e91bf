"""GrokAdamW (grokadamw.GrokAdamW): AdamW plus an EMA of gradients, amplified by lamb, for slow-varying gradients.

Learning rate: --learning_rate, else 6e-5 with --model_name_or_path (the best of 6.7e-6 to 1.8e-4 fine-tuning
SmolLM2-135M-Instruct for 30 steps, docs/finetune: 98% / 96% held-out accuracy on two seeds, 52% at the previous
2e-5), else 1e-3 for the embedded tiny model trained from scratch.
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
Built through GrokAdamWWithCheckpointableState (recipes/core/grokadamw_fixes.py): grokadamw 0.1.2 keys its moments
by Parameter object, so they would not survive a checkpoint.
Memory: 3 state tensors per parameter, kept on the CPU by grokadamw 0.1.2.
"""

import math

from optimizer_recipes.core.run.loop import main
from optimizer_recipes.core.optimizers.protocol import OptimizerRecipe, decay_parameter_groups, numel, refuse_flattened_partitions
from optimizer_recipes.core.optimizers.wrappers import unwrap_optimizer


class GrokAdamWRecipe(OptimizerRecipe):
    name = "grokadamw"
    order = 3
    default_learning_rate = 1e-3
    fine_tuning_learning_rate = 6e-5  # with --model_name_or_path: see the docstring
    reads_flags = ("adam_beta1", "adam_beta2", "adam_epsilon", "grokadamw_alpha_init", "grokadamw_lamb",
                   "grokadamw_gamma", "grokadamw_signal", "grokadamw_signal_decay_rate")
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
        # Imported here, after `recipes` is: run as a script, this file would otherwise shadow the package.
        from optimizer_recipes.core.grokadamw_fixes import GrokAdamWWithCheckpointableState

        t, o = config.train, config.optim
        return GrokAdamWWithCheckpointableState(decay_parameter_groups(model, t.weight_decay), lr=t.learning_rate,
                         betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon, alpha_init=o.grokadamw_alpha_init,
                         lamb=o.grokadamw_lamb, gamma=o.grokadamw_gamma,
                         grokking_signal_decay_rate=o.grokadamw_signal_decay_rate)


RECIPE = GrokAdamWRecipe()

if __name__ == "__main__":
    main(RECIPE)
