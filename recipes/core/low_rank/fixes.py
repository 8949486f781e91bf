"""A thin fix over galore-torch 1.0 and apollo-torch 1.0.3, tested in tests/test_resume.py (exact resume of the
galore, apollo and apollo_mini recipes) and tests/test_low_rank.py.

Both keep each target matrix's projector as a Python object in the optimizer state (state["projector"]: its
orthogonal or random matrix, and APOLLO's seed for the next one). torch.save pickles it, but accelerate's
load_state reads the optimizer state back with torch.load(weights_only=True), which refuses objects, so a resume
fails (the Trainer reloads with weights_only=True too: GaLore issue #35, ms-swift PR #10161). Here state_dict()
writes each projector as a dict of its attributes, and load_state_dict() rebuilds the projector from its group's
settings and puts them back: the matrix (in the dtype it was saved in: torch's load would cast it to its parameter's,
bf16 where the weights are bf16 and the step runs in fp32), the seed and the refresh schedule (driven by
state["step"]) go on as if the run had not stopped.

galore-torch 1.0 also keeps more than its rank: for fp32 gradients its projector is a slice of the SVD's U or Vh
(`U[:, :rank]`, `Vh[:rank, :]`), a view that keeps the whole factor alive, min(m, n) columns or rows instead of
rank (measured on SmolLM2-135M at rank 128: 617 MiB of optimizer state where 467 are the projections and moments).
`CompactProjectors` copies such a view into a tensor of its own after each step that refreshed it.
"""

from __future__ import annotations

import functools

import torch


class CheckpointableProjectors:
    """Mixin for an optimizer whose per-parameter state holds a "projector" object."""

    def new_projector(self, group: dict, state: dict):
        """A projector as the optimizer builds one on its first step for a parameter of this group."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        packed = super().state_dict()
        packed["state"] = {index: {**s, "projector": _attributes(s["projector"])} if "projector" in s else s
                           for index, s in packed["state"].items()}  # new dicts: packed ones are the live state
        return packed

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        saved = state_dict["state"]
        for index, p in enumerate(p for group in self.param_groups for p in group["params"]):
            state = self.state.get(p, {})
            if isinstance(state.get("projector"), dict):
                group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
                projector = self.new_projector(group, state)
                # torch's load casts every floating tensor in the state to its parameter's dtype, the projector's
                # matrix too: with bf16 weights stepped in fp32 (stochastic rounding) it was saved fp32, and a bf16
                # copy would fail the next projection (a dtype mismatch). Put back what was saved.
                vars(projector).update(state["projector"])
                vars(projector).update(_as_saved(saved[index]["projector"], p.device))
                state["projector"] = projector


class CompactProjectors:
    """Mixin: after each step, a projector matrix that is a view into a larger tensor becomes a copy of just itself."""

    def step(self, closure=None):
        loss = super().step(closure)
        for state in self.state.values():
            projector = state.get("projector")
            if projector is not None and _holds_more(projector.ortho_matrix):
                projector.ortho_matrix = _compact(projector.ortho_matrix)
        return loss


def _as_saved(attributes: dict, device) -> dict:
    """The projector's tensors (or lists of them) as they were saved, on the parameter's device."""
    def move(value):
        if torch.is_tensor(value):
            return value.to(device)
        return [move(v) for v in value] if isinstance(value, list) else value
    return {name: move(value) for name, value in attributes.items() if not isinstance(value, str)}


def _holds_more(matrix) -> bool:
    matrices = matrix if isinstance(matrix, list) else [matrix]  # proj_type "full": [U, Vh] slices
    return any(m is not None and m.untyped_storage().nbytes() > m.numel() * m.element_size() for m in matrices)


def _compact(matrix):
    return [m.clone() for m in matrix] if isinstance(matrix, list) else matrix.clone()


def _attributes(projector) -> dict:
    # Strings (the projection type) come back from the group: torch's load_state_dict would rebuild a string in the
    # state as an iterable of its characters. Tensors, numbers and None load with weights_only=True.
    return {name: value for name, value in vars(projector).items() if not isinstance(value, str)}


@functools.cache
def galore_adamw() -> type[torch.optim.Optimizer]:
    from galore_torch import GaLoreAdamW
    from galore_torch.galore_projector import GaLoreProjector

    class GaLoreAdamWWithCheckpointableProjectors(CompactProjectors, CheckpointableProjectors, GaLoreAdamW):
        def new_projector(self, group, state):
            return GaLoreProjector(group["rank"], update_proj_gap=group["update_proj_gap"], scale=group["scale"],
                                   proj_type=group["proj_type"])

    return GaLoreAdamWWithCheckpointableProjectors


@functools.cache
def apollo_adamw() -> type[torch.optim.Optimizer]:
    from apollo_torch import APOLLOAdamW

    class APOLLOAdamWWithCheckpointableProjectors(CompactProjectors, CheckpointableProjectors, APOLLOAdamW):
        def new_projector(self, group, state):
            return self._initialize_projector(group, state)  # what its step calls (random or SVD, by group["proj"])

    return APOLLOAdamWWithCheckpointableProjectors
