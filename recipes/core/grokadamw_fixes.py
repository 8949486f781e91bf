"""A thin fix over grokadamw 0.1.2, tested in tests/test_resume.py (exact resume of the grokadamw recipe)."""

from __future__ import annotations

from grokadamw import GrokAdamW


class GrokAdamWWithCheckpointableState(GrokAdamW):
    """GrokAdamW whose moments survive state_dict() / load_state_dict().

    grokadamw 0.1.2 keeps its moments in param_groups[i]["state"], a dict keyed by Parameter objects: state_dict()
    saves them keyed by copies of the old parameters, which load_state_dict() cannot match to the new ones, so a
    resume silently restarts every moment. Here they are keyed by the parameter's position in its group, as torch
    optimizers key their own state.
    """

    def state_dict(self) -> dict:
        packed = super().state_dict()
        for group, saved in zip(self.param_groups, packed["param_groups"]):
            by_param = group.get("state", {})
            saved["state"] = {i: by_param[p] for i, p in enumerate(group["params"]) if p in by_param}
        return packed

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            by_index = group.get("state", {})
            group["state"] = {group["params"][int(i)]: s for i, s in by_index.items()}
