"""The optimizer a recipe built, found inside the wrappers accelerate and DeepSpeed put around it."""

from __future__ import annotations


def unwrap_optimizer(optimizer):
    """The upstream optimizer inside accelerate's (and DeepSpeed's) wrappers."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer
