"""APOLLO-Mini (apollo_torch.APOLLOAdamW at rank 1, tensor-wise scaling): SGD-like memory, AdamW-like update.

The apollo recipe (recipes/apollo.py: what it supports, refuses and how it resumes) with the APOLLO authors'
APOLLO-Mini setting, as the Transformers docs give it: rank 1, scale_type tensor, scale 128, proj random,
update_proj_gap 200. Each target matrix keeps a rank-1 projection and its two moments: a few vectors, no
full-size state. The --apollo_* flags override the preset.
Learning rate: --learning_rate, else 5.4e-4 with --model_name_or_path (the best of the comparison's sweep, bracketed:
docs/finetune/report.md), else 1e-3 for the embedded tiny model.
Supports: what apollo does (every LR schedule, gradient accumulation, --max_grad_norm, --weight_decay on matrices
only, DDP). Refuses: DeepSpeed ZeRO and FSDP (see recipes/apollo.py).
Licence: apollo-torch is CC-BY-NC 4.0 (non-commercial use only): pip install -e ".[apollo]".
"""

from dataclasses import dataclass, field

from optimizer_recipes.apollo import ApolloKnobs, ApolloRecipe
from optimizer_recipes.core.run.loop import main


@dataclass
class ApolloMiniKnobs(ApolloKnobs):
    apollo_rank: int = field(default=1, metadata={"help": "APOLLO: rank of the random projection."})
    apollo_scale: float = field(default=128.0, metadata={"help": "APOLLO: scale of the update."})
    apollo_scale_type: str = field(
        default="tensor", metadata={"help": "APOLLO: channel (one scaling factor per row or column) or tensor."})


class ApolloMiniRecipe(ApolloRecipe):
    name = "apollo_mini"
    order = 10
    trainer_optim = "apollo_adamw"  # the Transformers Trainer's optim= name
    knobs = ApolloMiniKnobs
    default_rank = ApolloMiniKnobs.apollo_rank
    default_scale = ApolloMiniKnobs.apollo_scale
    default_scale_type = ApolloMiniKnobs.apollo_scale_type
    fine_tuning_learning_rate = 5.4e-4  # with --model_name_or_path: see the docstring
    source_settings = ()


RECIPE = ApolloMiniRecipe()

if __name__ == "__main__":
    main(RECIPE)
