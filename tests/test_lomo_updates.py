"""The linear-time LOMO and AdaLomo updates give lomo-optim's weights, bit for bit, in every mode the recipes use.

One process here (the optimizers side by side on two copies of a model); 2-process DDP and ZeRO-3 in
test_distributed.py (tests/lomo_updates_check.py, launched)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from lomo_optim import AdaLomo, Lomo
from optimizer_recipes.core.data.embedded import EMBEDDED_DIR
from optimizer_recipes.core.fused_backward import lomo_updates
from optimizer_recipes.core.fused_backward.lomo_fixes import AdaLomoOnModelDevice
from optimizer_recipes.core.fused_backward.lomo_updates import LinearTimeAdaLomo, LinearTimeLomo
from transformers import AutoConfig, AutoModelForCausalLM

from tests.conftest import CONFIGS, REPO, free_port, offline_env

STEPS = 3
# (upstream class, ours, keyword arguments, weight dtype); lr is passed per step, as the recipes' scheduler does
MODES = {
    "lomo": (Lomo, LinearTimeLomo, {}, torch.float32),
    "lomo clip value, weight decay": (Lomo, LinearTimeLomo, {"clip_grad_value": 1e-3, "weight_decay": 0.1},
                                      torch.float32),
    "lomo two-pass global norm": (Lomo, LinearTimeLomo, {"clip_grad_norm": 0.5}, torch.float32),
    "lomo bf16 weights": (Lomo, LinearTimeLomo, {"clip_grad_value": 1e-2, "weight_decay": 0.1}, torch.bfloat16),
    "lomo bf16 weights, global norm": (Lomo, LinearTimeLomo, {"clip_grad_norm": 0.5}, torch.bfloat16),
    # a float16 loss switches on lomo-optim's dynamic loss scaler, which needs global-norm clipping
    "lomo fp16 loss": (Lomo, LinearTimeLomo, {"clip_grad_norm": 1.0, "loss_scale_args": {"init_scale": 2.0 ** 4}},
                       torch.float32),
    # upstream AdaLomo cannot be built on a CPU: AdaLomoOnModelDevice is it with its state on the model's device
    "adalomo": (AdaLomoOnModelDevice, LinearTimeAdaLomo, {}, torch.float32),
    "adalomo clip value, weight decay, loss scale": (
        AdaLomoOnModelDevice, LinearTimeAdaLomo, {"clip_grad_value": 1e-3, "weight_decay": 0.1, "loss_scale": 2 ** 6},
        torch.float32),
    "adalomo two-pass global norm": (AdaLomoOnModelDevice, LinearTimeAdaLomo, {"clip_grad_norm": 0.5},
                                     torch.float32),
    "adalomo bf16 weights": (AdaLomoOnModelDevice, LinearTimeAdaLomo, {"weight_decay": 0.1}, torch.bfloat16),
}


def embedded_model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(EMBEDDED_DIR)).to(dtype)


def train(optimizer, model, batches, fp16_loss: bool) -> list[float]:
    norms = []
    for step, batch in enumerate(batches):
        lr = 0.05 * (1 - step / len(batches))  # a decaying schedule: the lr of each step must be used
        loss = model(input_ids=batch, labels=batch).loss
        loss = loss.half() if fp16_loss else loss
        if optimizer.clip_grad_norm:
            optimizer.grad_norm(loss)
            norms.append(float(torch.norm(optimizer.grad_norms, 2.0)))
        optimizer.fused_backward(loss, lr)
    return norms


@pytest.mark.parametrize("mode", MODES)
def test_same_weights_as_lomo_optim(mode, monkeypatch):
    upstream_class, ours_class, kwargs, dtype = MODES[mode]
    monkeypatch.setattr(lomo_updates, "UPDATE_CHUNK", 1000)  # many chunks per tensor even on this small model
    theirs = embedded_model(dtype)
    ours = copy.deepcopy(theirs)
    batches = [torch.randint(0, 497, (4, 32), generator=torch.Generator().manual_seed(i)) for i in range(STEPS)]

    upstream = upstream_class(theirs, lr=0.05, **kwargs)
    linear = ours_class(ours, lr=0.05, **kwargs)
    assert isinstance(linear, AdaLomo if ours_class is LinearTimeAdaLomo else Lomo)  # accelerate's LOMO path
    fp16_loss = "fp16 loss" in mode
    assert train(upstream, theirs, batches, fp16_loss) == train(linear, ours, batches, fp16_loss)

    changed = 0
    for (name, a), b in zip(theirs.named_parameters(), ours.parameters()):
        assert a.dtype == b.dtype == dtype
        assert torch.equal(a, b), f"{mode}: {name} differs from lomo-optim's"
        changed += not torch.equal(a, embedded_model(dtype).get_parameter(name))
    # every tensor was updated (in bf16, steps below a weight's precision vanish on a few small vectors)
    tensors = len(list(ours.parameters()))
    assert changed == tensors if dtype == torch.float32 else changed > 0.7 * tensors
    assert all(p.grad is None for p in ours.parameters())  # no gradient kept: the point of LOMO
    if ours_class is LinearTimeAdaLomo:
        for name in ("exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col"):
            for key, value in getattr(upstream, name).items():
                assert torch.equal(value, getattr(linear, name)[key]), f"{mode}: AdaLomo {name}[{key}]"


def test_one_hook_per_parameter_and_none_of_lomo_optims():
    model = embedded_model(torch.float32)
    register_hook = torch.Tensor.register_hook
    optimizer = LinearTimeLomo(model, lr=0.1)
    assert torch.Tensor.register_hook is register_hook  # the switch-off during construction is undone
    loss = model(input_ids=torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long)).loss
    calls = []
    optimizer._update = lambda name, p: calls.append(name)
    optimizer.fused_backward(loss, 0.1)
    assert sorted(calls) == sorted(name for name, _ in model.named_parameters())  # each once, none scanned twice


@pytest.mark.parametrize("config, modes", [("multi_gpu.yaml", 8), ("zero3.yaml", 6)])
def test_same_weights_as_lomo_optim_on_two_processes(config, modes):
    """DDP (gradients averaged before each update) and engine-free ZeRO-3 (each rank updates its partition; no
    global-norm clipping there, which the recipes refuse): tests/lomo_updates_check.py in each of 2 processes."""
    env = offline_env(**({"ACCELERATE_USE_CPU": "1"} if config == "multi_gpu.yaml" else {}))
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
                           "--main_process_port", str(free_port()), str(REPO / "tests" / "lomo_updates_check.py")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(": same weights") == modes
    assert f"checked {modes} modes on 2 processes" in proc.stdout


def update_peak_bytes(optimizer_class, dtype: torch.dtype) -> int:
    """The most memory one parameter's update holds at once beyond the parameter (its gradient included), measured
    with torch's MemTracker around the hook that applies it."""
    from torch.distributed._tools.mem_tracker import MemTracker

    model = torch.nn.Linear(512, 512, bias=False).to(dtype)
    optimizer = optimizer_class(model, lr=0.1)
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        model.weight.grad = torch.randn(512, 512, dtype=dtype)
        if hasattr(optimizer, "_gradient_ready"):
            optimizer._gradient_ready("weight", model.weight)
        else:
            optimizer.grad_func(0)  # lomo-optim's hook: updates every parameter with a gradient
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    return peak["Total"] - model.weight.numel() * model.weight.element_size()


@pytest.mark.parametrize("recipe, ours, upstream", [("lomo", LinearTimeLomo, Lomo),
                                                    ("adalomo", LinearTimeAdaLomo, AdaLomoOnModelDevice)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_estimator_counts_what_an_update_holds(recipe, ours, upstream, dtype, monkeypatch):
    from optimizer_recipes.core.optimizers.protocol import all_recipes

    chunk = 512 * 512 // 8
    monkeypatch.setattr(lomo_updates, "UPDATE_CHUNK", chunk)
    estimator = next(r for r in all_recipes() if r.name == recipe)
    shapes, element_bytes = [(512, 512)], torch.finfo(dtype).bits // 8
    estimated = estimator.gradient_bytes(shapes, element_bytes) + estimator.update_bytes(shapes, element_bytes)
    measured = update_peak_bytes(ours, dtype)
    assert measured == pytest.approx(estimated, rel=0.01)
    # lomo-optim holds the whole tensor upcast: LOMO 8 bytes per element in 16 bits, AdaLomo 12 either way
    assert measured < update_peak_bytes(upstream, dtype) or (recipe, dtype) == ("lomo", torch.float32)
