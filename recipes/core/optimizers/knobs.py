"""Knobs several recipes share, written once. Each recipe declares the dataclass of the flags its optimizer reads
(`OptimizerRecipe.knobs`, with its own defaults), often by extending one of these; `optimizer_arguments(recipe)`
(recipes/core/optimizers/protocol.py) is what a run parses them into."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AdamKnobs:
    """Adam's betas and epsilon (TrainingArguments' names and defaults)."""

    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
