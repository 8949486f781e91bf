"""GaLore (galore_torch.GaLoreAdamW): AdamW on a rank-r projection of each target matrix's gradient.

For each target m x n matrix the optimizer keeps an orthogonal projector from an SVD of the gradient, refreshed
every --galore_update_interval steps, and Adam moments of the projected gradient (m x r or r x n) instead of two
full-size ones; the update is projected back and scaled by --galore_scale. Targets (--optim_target_modules):
default every nn.Linear but the output layer, i.e. the decoder blocks' projections; the embedding, the output
layer, norms and biases get full-rank AdamW.
Defaults are the fine-tuning ones: rank 16, scale 2, update_proj_gap 200, proj_type std, LLaMA-Factory's (whose
flag names these are: --galore_rank, --galore_scale, --galore_update_interval, --galore_proj_type), inside the GaLore
authors' fine-tuning range (rank 4-256, scale 2-4); their pre-training setting, scale 0.25 at rank 128, is the
Transformers Trainer's default for optim="galore_adamw", and the comparison runs it beside these defaults.
Learning rate: --learning_rate, else 9e-4 with --model_name_or_path (the best of the comparison's sweep at these
defaults: docs/finetune/report.md), else 1e-3 for the embedded tiny model trained from scratch.
Supports: every LR schedule with --warmup_steps, gradient accumulation, --max_grad_norm (default 1.0),
--weight_decay on matrices only (the Trainer's GaLore groups drop it), --adam_beta1/--adam_beta2/--adam_epsilon,
DDP (every process computes the same SVD of the same averaged gradient).
Refuses: DeepSpeed ZeRO (its flat 1-D partitions have no matrix to take an SVD of; LLaMA-Factory refuses it too),
FSDP2 (it trains as one process does, but a run resumed from its checkpoint does not continue exactly: measured 3e-4
off in the loss, cause not found).
Built as GaLoreAdamWWithCheckpointableProjectors (recipes/core/low_rank/fixes.py): galore-torch keeps each
projector as an object that a resume (torch.load with weights_only=True) refuses. Its per-layer variant
(Transformers' galore_adamw_layerwise: each matrix updated inside backward, its gradient then freed) is
--optimizer_in_backward true here, on one process or DDP, resuming exactly. Install: pip install -e ".[galore]".
"""

from dataclasses import dataclass, field

from optimizer_recipes.core.low_rank.recipe import LowRankKnobs, LowRankRecipe
from optimizer_recipes.core.optimizers.protocol import refuse_sharded_tensors
from optimizer_recipes.core.run.loop import main


@dataclass
class GaLoreKnobs(LowRankKnobs):
    galore_rank: int = field(default=16, metadata={"help": "GaLore: rank of the projection."})
    galore_update_interval: int = field(
        default=200, metadata={"help": "GaLore: steps between refreshes of the projection (an SVD of the gradient)."})
    galore_scale: float = field(default=2.0, metadata={"help": "GaLore: scale of the projected-back update."})
    galore_proj_type: str = field(
        default="std", metadata={"help": "GaLore: std (project the shorter side), reverse_std, left, right or full."})



class GaLoreRecipe(LowRankRecipe):
    name = "galore"
    order = 8
    trainer_optim = "galore_adamw"  # the Transformers Trainer's optim= name
    default_learning_rate = 1e-3
    fine_tuning_learning_rate = 9e-4  # with --model_name_or_path: see the docstring
    knobs = GaLoreKnobs
    requires = ("galore_torch", '-e ".[galore]" (or: pip install galore-torch==1.0)')
    projection_words = "the singular vectors"
    default_rank = GaLoreKnobs.galore_rank
    default_scale = GaLoreKnobs.galore_scale
    source_settings = (("the Transformers Trainer's defaults for galore_adamw (rank 128, scale 0.25: GaLore's "
                        "pre-training setting), at the best lr of their sweep (its cap)", 5.4e-4,
                        ("--galore_rank", "128", "--galore_scale", "0.25")),)
    proj_types = ("std", "reverse_std", "right", "left", "full")

    def rank_is_capped(self):
        return True  # the projector is cut from an SVD: at most min(m, n) vectors

    def refuse(self, config):
        o = config.optim
        if o.galore_proj_type not in self.proj_types:
            return f"--galore_proj_type {o.galore_proj_type}: choose one of {', '.join(self.proj_types)}"
        for flag in ("galore_rank", "galore_update_interval"):
            if getattr(o, flag) < 1:
                return f"--{flag} must be at least 1, got {getattr(o, flag)}"
        return refuse_sharded_tensors(
            self, config, "its checkpoints do not resume exactly (the projectors and projected moments come back "
            "from torch's distributed checkpoint sharded like the weights; measured on 2 processes: the resumed "
            "losses 3e-4 away from the uninterrupted run's)") or super().refuse(config)

    def projection(self, config):
        o = config.optim
        return {"rank": o.galore_rank, "update_proj_gap": o.galore_update_interval, "scale": o.galore_scale,
                "proj_type": o.galore_proj_type}

    def build_optimizer(self, groups, config):
        from optimizer_recipes.core.low_rank.fixes import galore_adamw

        t, o = config.train, config.optim
        return galore_adamw()(groups, lr=t.learning_rate, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon,
                              no_deprecation_warning=True)


RECIPE = GaLoreRecipe()

if __name__ == "__main__":
    main(RECIPE)
