"""What GaLore and APOLLO share: a low-rank projection of chosen weight matrices' gradients.

`LowRankRecipe` is an ordinary-step recipe whose optimizer keeps, for each target matrix (m x n), a projector and
Adam moments of the projected gradient instead of full-size moments: the other parameters get full-rank AdamW. It
picks the targets (`--optim_target_modules`, TrainingArguments' name; default every nn.Linear but the output
layer: the decoder blocks' projections), builds the parameter groups with weight decay on matrices only (the
Trainer's low-rank builder drops the weight-decay groups), refuses DeepSpeed ZeRO (whose flat partitions are not
matrices), and counts the state for the memory estimator. Each recipe file says which package and projection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
from optimizer_recipes.core.optimizers.knobs import AdamKnobs
from optimizer_recipes.core.optimizers.protocol import (
    OptimizerRecipe,
    numel,
    parameter_roles,
    refuse_flattened_partitions,
)

if TYPE_CHECKING:
    from optimizer_recipes.core.run.config import Config

ALL_LINEAR = "all-linear"


def target_matrices(model: torch.nn.Module, patterns: str) -> list[torch.nn.Parameter]:
    """The weights the projection targets: `all-linear` (the weights parameter_roles calls "linear": every
    nn.Linear but the output layer) or the nn.Linear modules whose name contains one of the comma-separated parts."""
    if patterns == ALL_LINEAR:
        params = [p for p in model.parameters() if p.requires_grad]
        return [p for p, role in zip(params, parameter_roles(model)) if role == "linear"]
    parts = [part.strip() for part in patterns.split(",") if part.strip()]
    output = model.get_output_embeddings()
    return [m.weight for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not output and m.weight.requires_grad
            and any(part in name for part in parts)]


def low_rank_parameter_groups(model: torch.nn.Module, patterns: str, weight_decay: float,
                              projection: dict) -> list[dict]:
    """Three groups: the target matrices (with the projection's settings), the other matrices, and the vectors
    (biases, norms: no weight decay)."""
    targets = {id(p) for p in target_matrices(model, patterns)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) in targets], "weight_decay": weight_decay, **projection},
              {"params": [p for p in params if id(p) not in targets and p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) not in targets and p.dim() < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def projected_shape(shape: tuple[int, int], rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(projector, projected gradient) shapes of an m x n matrix under the "std" projection both packages default
    to: the shorter side is projected down to `rank` (from the right when m >= n, from the left otherwise)."""
    m, n = shape
    if m >= n:
        return (rank, n), (m, rank)
    return (m, rank), (rank, n)


@dataclass
class LowRankKnobs(AdamKnobs):
    optim_target_modules: str = field(
        default="all-linear", metadata={"help": "GaLore/APOLLO: the nn.Linear modules whose weight gradients are "
                                                 "projected: all-linear (every nn.Linear but the output layer: the "
                                                 "decoder blocks' projections) or comma-separated parts of module "
                                                 "names (e.g. self_attn,mlp); the rest get full-rank AdamW."})


class LowRankRecipe(OptimizerRecipe):
    """An AdamW whose target matrices' moments live in a rank-r projection of their gradients."""

    projection_words = ""  # what the projection needs of each weight matrix, for the refusals
    default_rank = 128  # what the memory estimator counts (it sees shapes, not flags): the knobs' default
    default_scale = 1.0

    def projection(self, config: Config) -> dict:
        """The target group's settings, as the optimizer reads them."""
        raise NotImplementedError

    def rank_is_capped(self) -> bool:
        """True where the projector has at most min(m, n) rows or columns (an SVD's), whatever the rank asked."""
        return False

    def refuse(self, config: Config) -> Optional[str]:
        return refuse_flattened_partitions(
            self, config, f"the low-rank projection needs {self.projection_words} of each weight matrix",
            instead="multi_gpu.yaml")

    def refuse_model(self, config: Config, model_config) -> Optional[str]:
        from optimizer_recipes.core.memory.estimate import meta_model

        patterns = config.optim.optim_target_modules
        model = meta_model(None, config.model.trust_remote_code, config=model_config)
        if target_matrices(model, patterns):
            return None
        output = model.get_output_embeddings()
        names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and m is not output})
        return (f"--optim_target_modules {patterns} matches no nn.Linear module of this model; its linear modules "
                f"are named {', '.join(names)} (give parts of those names, comma-separated, or {ALL_LINEAR})")

    def optimizer_state_bytes(self, shapes, element_bytes):
        """At the default rank, with the default targets (`shapes.roles`: see ParameterShapes)."""
        total = 0
        for shape, role in zip(shapes, getattr(shapes, "roles", ["other"] * len(shapes))):
            if role == "linear" and len(shape) == 2:
                r = min(self.default_rank, *shape) if self.rank_is_capped() else self.default_rank
                projector, moment = projected_shape(shape, r)
                total += (numel(projector) + 2 * numel(moment)) * element_bytes
            else:
                total += 2 * numel(shape) * element_bytes  # full-rank AdamW moments
        return total

    def trainer_arguments(self) -> dict:
        """The Trainer's low-rank optimizers need their targets (every linear layer of the decoder blocks), and the
        rank and scale (the recipes' fine-tuning defaults and APOLLO-Mini's preset differ from the Trainer's)."""
        optim_args = f"rank={self.default_rank},scale={self.default_scale:g}"
        if hasattr(self, "default_scale_type"):
            optim_args += f",scale_type={self.default_scale_type}"
        return {"optim_target_modules": ["self_attn", "mlp"], "optim_args": optim_args}

    def build_optimizer(self, groups: list[dict], config: Config) -> torch.optim.Optimizer:
        raise NotImplementedError

    def build(self, model, config):
        t = config.train
        groups = low_rank_parameter_groups(model, config.optim.optim_target_modules, t.weight_decay,
                                           self.projection(config))
        return self.build_optimizer(groups, config)
