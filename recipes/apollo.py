"""APOLLO (apollo_torch.APOLLOAdamW): AdamW's per-channel scaling estimated in a random rank-r projection.

For each target m x n matrix the optimizer keeps Adam moments of a randomly projected gradient (m x r or r x n,
the projection regenerated from a seed every --apollo_update_interval steps) and scales the raw gradient by the
ratio of the adapted to the projected gradient's norms, per channel (--apollo_scale_type channel) or per tensor,
with Fira's norm-growth limiter. Targets (--optim_target_modules): default every nn.Linear but the output layer,
i.e. the decoder blocks' projections; the embedding, the output layer, norms and biases get full-rank AdamW.
APOLLO-Mini (rank 1, tensor scaling) is its own recipe, recipes/apollo_mini.py.
Defaults are the fine-tuning ones, LLaMA-Factory's (whose flag names these are): rank 16, scale 32, scale_type
channel, proj random, update_proj_gap 200, proj_type std (--apollo_rank, --apollo_scale, --apollo_scale_type,
--apollo_proj, --apollo_update_interval, --apollo_proj_type). The Transformers Trainer's default for
optim="apollo_adamw" is the APOLLO authors' pre-training setting, rank 128 and scale 1; docs/finetune/report.md has it
beside these defaults.
Learning rate: --learning_rate, else 5.4e-4 with --model_name_or_path (the best of the comparison's sweep at these
defaults: docs/finetune/report.md), else 1e-3 for the embedded tiny model trained from scratch.
Supports: every LR schedule with --warmup_steps, gradient accumulation, --max_grad_norm (default 1.0),
--weight_decay on matrices only (the Trainer's APOLLO groups drop it), --adam_beta1/--adam_beta2/--adam_epsilon,
DDP (every process draws the same projection from the same seed).
Refuses: DeepSpeed ZeRO (its flat 1-D partitions have no rows and columns to project; LLaMA-Factory refuses it
too) and FSDP (apollo-torch keys each projection seed by the parameters it was built with, which FSDP2 replaces
with their shards: measured, its first step stops with KeyError: 'seed').
Built as APOLLOAdamWWithCheckpointableProjectors (recipes/core/low_rank/fixes.py): apollo-torch keeps each
projector, with the seed of its next projection, as an object that a resume (torch.load with weights_only=True)
refuses. Its per-layer variant (apollo_adamw_layerwise) is
--optimizer_in_backward true here, on one process or DDP, resuming exactly.
Licence: apollo-torch is CC-BY-NC 4.0 (non-commercial use only); it is an optional extra, not installed with the
project: pip install -e ".[apollo]".
"""

from dataclasses import dataclass, field

from optimizer_recipes.core.low_rank.recipe import LowRankKnobs, LowRankRecipe
from optimizer_recipes.core.optimizers.protocol import refuse_sharded_tensors
from optimizer_recipes.core.run.loop import main


@dataclass
class ApolloKnobs(LowRankKnobs):
    apollo_rank: int = field(default=16, metadata={"help": "APOLLO: rank of the random projection."})
    apollo_update_interval: int = field(
        default=200, metadata={"help": "APOLLO: steps between refreshes of the projection."})
    apollo_scale: float = field(default=32.0, metadata={"help": "APOLLO: scale of the update."})
    apollo_scale_type: str = field(
        default="channel", metadata={"help": "APOLLO: channel (one scaling factor per row or column) or tensor."})
    apollo_proj: str = field(default="random", metadata={"help": "APOLLO: random (seeded) or svd projection."})
    apollo_proj_type: str = field(
        default="std", metadata={"help": "APOLLO: std (project the shorter side), reverse_std, left or right."})



class ApolloRecipe(LowRankRecipe):
    name = "apollo"
    order = 9
    trainer_optim = "apollo_adamw"  # the Transformers Trainer's optim= name
    default_learning_rate = 1e-3
    fine_tuning_learning_rate = 5.4e-4  # with --model_name_or_path: see the docstring
    knobs = ApolloKnobs
    requires = ("apollo_torch", '-e ".[apollo]" (or: pip install apollo-torch==1.0.3; licence CC-BY-NC 4.0)')
    projection_words = "the rows and columns"
    default_rank = ApolloKnobs.apollo_rank
    default_scale = ApolloKnobs.apollo_scale
    source_settings = (("the Transformers Trainer's defaults for apollo_adamw (rank 128, scale 1: APOLLO's "
                        "pre-training setting), at the best lr of their sweep (its cap)", 5.4e-4,
                        ("--apollo_rank", "128", "--apollo_scale", "1")),)
    default_scale_type = ApolloKnobs.apollo_scale_type
    proj_types = ("std", "reverse_std", "right", "left")

    def rank_is_capped(self):
        return False  # a random projection has `rank` rows or columns whatever the matrix

    def refuse(self, config):
        o = config.optim
        choices = {"apollo_proj": ("random", "svd"), "apollo_proj_type": self.proj_types,
                   "apollo_scale_type": ("channel", "tensor")}
        for flag, allowed in choices.items():
            if getattr(o, flag) not in allowed:
                return f"--{flag} {getattr(o, flag)}: choose one of {', '.join(allowed)}"
        for flag in ("apollo_rank", "apollo_update_interval"):
            if getattr(o, flag) < 1:
                return f"--{flag} must be at least 1, got {getattr(o, flag)}"
        return refuse_sharded_tensors(
            self, config, "apollo-torch records each parameter's projection seed when the optimizer is built, and "
            "FSDP2 then replaces the parameters with their DTensor shards, so the first step fails (KeyError: "
            "'seed')") or super().refuse(config)

    def projection(self, config):
        o = config.optim
        return {"rank": o.apollo_rank, "proj": o.apollo_proj, "scale_type": o.apollo_scale_type,
                "update_proj_gap": o.apollo_update_interval, "scale": o.apollo_scale, "proj_type": o.apollo_proj_type}

    def build_optimizer(self, groups, config):
        from optimizer_recipes.core.low_rank.fixes import apollo_adamw

        t, o = config.train, config.optim
        return apollo_adamw()(groups, lr=t.learning_rate, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon)


RECIPE = ApolloRecipe()

if __name__ == "__main__":
    main(RECIPE)
