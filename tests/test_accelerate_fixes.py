"""accelerate_fixes.look_up_lomo_once: an optimizer step reads no package metadata (the FSDP and unconnected-process
fixes are tested by the launches in test_distributed.py)."""

from __future__ import annotations

import torch
from accelerate.utils import imports
from optimizer_recipes.adamw import RECIPE
from optimizer_recipes.core.run.config import parse_config
from optimizer_recipes.core.run.run_setup import build_accelerator


def test_optimizer_steps_do_not_look_up_packages(tmp_path, monkeypatch, fresh_accelerate_state):
    lookups = []
    look_up = imports._is_package_available
    monkeypatch.setattr(imports, "_is_package_available", lambda *a, **k: lookups.append(a) or look_up(*a, **k))
    accelerator = build_accelerator(parse_config(RECIPE, ["--output_dir", str(tmp_path)]), RECIPE)
    model = torch.nn.Linear(4, 1)
    optimizer = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    lookups.clear()  # what preparing looked up once
    for _ in range(5):
        model(torch.ones(2, 4)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert len(lookups) <= 1  # accelerate 1.15 alone: two lookups of lomo_optim per step
