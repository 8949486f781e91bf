"""APOLLO-Mini (apollo_torch.APOLLOAdamW at rank 1, tensor-wise scaling): SGD-like memory, AdamW-like update.

The apollo recipe (recipes/apollo.py: what it supports, refuses and how it resumes) with the APOLLO authors'
APOLLO-Mini setting, as the Transformers docs give it: rank 1, scale_type tensor, scale 128, proj random,
update_proj_gap 200. Each target matrix keeps a rank-1 projection and its two moments: a few vectors, no
full-size state. The --apollo_* flags override the preset.
Learning rate: --learning_rate, else 2e-5 with --model_name_or_path (the comparison's sweep: docs/finetune/report.md),
else 1e-3 for the embedded tiny model.
Supports: what apollo does (every LR schedule, gradient accumulation, --max_grad_norm, --weight_decay on matrices
only, DDP). Refuses: DeepSpeed ZeRO and FSDP (see recipes/apollo.py).
Licence: apollo-torch is CC-BY-NC 4.0 (non-commercial use only): pip install -e ".[apollo]".
"""

from optimizer_recipes.apollo import ApolloRecipe
from optimizer_recipes.core.run.loop import main


class ApolloMiniRecipe(ApolloRecipe):
    name = "apollo_mini"
    order = 10
    default_rank = 1
    default_scale = 128.0
    default_scale_type = "tensor"


RECIPE = ApolloMiniRecipe()

if __name__ == "__main__":
    main(RECIPE)
