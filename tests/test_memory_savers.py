"""The memory savers users weigh against LOMO (galore, apollo, apollo_mini, adamw_8bit, stable_adamw): what each
recipe builds, the upstream defect its fix layer removes, and the one-line refusals. Training, resume, the
compatibility matrix and the memory estimate run for them in the suite's shared tests, like the first seven."""

from __future__ import annotations

import importlib.util
import io

import pytest
import torch
from optimizer_recipes.core.low_rank import fixes as low_rank_fixes
from optimizer_recipes.core.low_rank.recipe import target_matrices
from optimizer_recipes.core.models.sources import load_model, load_model_config
from optimizer_recipes.core.optimizers.protocol import all_recipes, parameter_roles
from optimizer_recipes.core.run.config import Config, DataArguments, ModelArguments, TrainArguments
from optimizer_recipes.core.run.loop import main

RECIPES = {r.name: r for r in all_recipes()}
MEMORY_SAVERS = ("galore", "apollo", "apollo_mini", "adamw_8bit", "stable_adamw")


def embedded_model_and_config(recipe: str, **optim) -> tuple[torch.nn.Module, Config]:
    config = Config(ModelArguments(), DataArguments(), TrainArguments(), RECIPES[recipe].arguments_class()(**optim),
                    recipe=recipe)
    RECIPES[recipe].fill_defaults(config)
    torch.manual_seed(0)
    return load_model(config, load_model_config(config)), config


def one_step(model, optimizer, seed: int) -> None:
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_the_projection_targets_the_decoder_linear_weights_only():
    model, config = embedded_model_and_config("galore")
    targets = {id(p) for p in target_matrices(model, "all-linear")}
    names = [n for n, p in model.named_parameters() if id(p) in targets]
    assert names and all(".layers." in n and n.endswith("proj.weight") for n in names)
    assert id(model.get_input_embeddings().weight) not in targets
    assert id(model.get_output_embeddings().weight) not in targets
    only_mlp = [n for n, p in model.named_parameters() if id(p) in {id(q) for q in target_matrices(model, "mlp")}]
    assert only_mlp and all(".mlp." in n for n in only_mlp)


@pytest.mark.parametrize("recipe", ["galore", "apollo"])
def test_weight_decay_reaches_the_matrices_and_not_the_vectors(recipe):
    model, config = embedded_model_and_config(recipe)
    config.train.weight_decay = 0.1
    optimizer = RECIPES[recipe].build(model, config)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert all(decay[id(p)] == (0.1 if p.dim() >= 2 else 0.0) for p in model.parameters())
    projected = [g for g in optimizer.param_groups if "rank" in g]
    assert len(projected) == 1 and projected[0]["weight_decay"] == 0.1


@pytest.mark.parametrize("factory, projection", [
    (low_rank_fixes.galore_adamw, {"rank": 4, "update_proj_gap": 2, "scale": 0.25, "proj_type": "std"}),
    (low_rank_fixes.apollo_adamw, {"rank": 4, "update_proj_gap": 2, "scale": 1.0, "proj_type": "std",
                                   "proj": "random", "scale_type": "channel"})])
def test_projectors_survive_a_weights_only_checkpoint_and_the_next_refresh(factory, projection):
    """Upstream's state holds projector objects, which torch.load(weights_only=True) (accelerate's load_state)
    refuses; through the fix the reloaded optimizer takes the same steps as the uninterrupted one, across two
    refreshes of the projection (every 2 steps here)."""
    upstream = next(c for c in factory().__mro__ if c.__module__.split(".")[0] in ("galore_torch", "apollo_torch"))

    def build(cls):
        model, _ = embedded_model_and_config("galore")
        targets = {id(p) for p in target_matrices(model, "all-linear")}
        groups = [{"params": [p for p in model.parameters() if id(p) in targets], **projection},
                  {"params": [p for p in model.parameters() if id(p) not in targets]}]
        return model, cls(groups, lr=1e-3, no_deprecation_warning=True)  # both packages take it

    model, optimizer = build(upstream)
    for seed in range(3):
        one_step(model, optimizer, seed)
    saved = io.BytesIO()
    torch.save(optimizer.state_dict(), saved)
    saved.seek(0)
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        torch.load(saved, weights_only=True)

    straight_model, straight = build(factory())
    for seed in range(3):
        one_step(straight_model, straight, seed)
    saved = io.BytesIO()
    torch.save({"model": straight_model.state_dict(), "optimizer": straight.state_dict()}, saved)
    for seed in range(3, 8):
        one_step(straight_model, straight, seed)

    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=True)
    resumed_model, resumed = build(factory())
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["optimizer"])
    for seed in range(3, 8):
        one_step(resumed_model, resumed, seed)
    for a, b in zip(straight_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_8bit_adamw_keeps_the_embedding_in_32_bits_and_the_matrices_in_8():
    model, config = embedded_model_and_config("adamw_8bit")
    optimizer = RECIPES["adamw_8bit"].build(model, config)
    one_step(model, optimizer, 0)
    roles = dict(zip((id(p) for p in model.parameters()), parameter_roles(model)))
    for p in model.parameters():
        state1 = optimizer.state[p]["state1"]
        if roles[id(p)] == "embedding" or p.numel() < 4096:
            assert state1.dtype == torch.float32
        else:
            assert state1.dtype == torch.uint8


@pytest.mark.parametrize("recipe", MEMORY_SAVERS)
def test_a_missing_package_is_one_line_with_the_pip_command(recipe, tmp_path, capsys, monkeypatch):
    module, pip = RECIPES[recipe].requires
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real_find_spec(name, *a))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        main(RECIPES[recipe], ["--max_steps", "2", "--output_dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 1
    assert err[0] == f"{recipe}: error: the {recipe} recipe needs the {module} package, which is not installed: pip install {pip}"
    assert not out.exists()


@pytest.mark.parametrize("recipe, args, expected", [
    ("galore", ["--optim_target_modules", "attention_block"],
     "--optim_target_modules attention_block matches no nn.Linear module of this model; its linear modules are named "
     "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
    ("apollo", ["--apollo_scale_type", "row"], "--apollo_scale_type row: choose one of channel, tensor"),
    ("galore", ["--galore_rank", "0"], "--galore_rank must be at least 1, got 0"),
    ("adamw", ["--galore_rank", "8"], "--galore_rank has no effect on adamw; it is read by galore"),
    ("apollo_mini", ["--galore_scale", "2"], "--galore_scale has no effect on apollo_mini; it is read by galore"),
])
def test_a_bad_knob_stops_before_the_model_loads(recipe, args, expected, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        main(RECIPES[recipe], [*args, "--max_steps", "2", "--output_dir", str(out)])
    captured = capsys.readouterr()
    assert stopped.value.code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{recipe}: error: {expected}"), captured.err
    assert "parameters" not in captured.out and not out.exists()


def test_apollo_mini_is_apollo_at_rank_one_with_tensor_scaling():
    model, config = embedded_model_and_config("apollo_mini")
    group = next(g for g in RECIPES["apollo_mini"].build(model, config).param_groups if "rank" in g)
    assert (group["rank"], group["scale_type"], group["scale"], group["proj"]) == (1, "tensor", 128.0, "random")
    model, config = embedded_model_and_config("apollo_mini", apollo_rank=4)
    group = next(g for g in RECIPES["apollo_mini"].build(model, config).param_groups if "rank" in g)
    assert group["rank"] == 4  # the flags override the preset


@pytest.mark.parametrize("proj", ["galore", "apollo svd"])
def test_an_svd_projector_holds_its_rank_not_the_whole_factor(proj):
    """Upstream keeps U[:, :rank] / Vh[:rank, :], views of the whole SVD factor; the fix keeps rank rows only."""
    recipe, extra = ("galore", {}) if proj == "galore" else ("apollo", {"apollo_proj": "svd"})
    model, config = embedded_model_and_config(recipe, **extra)
    config.optim.galore_rank = config.optim.apollo_rank = 4
    optimizer = RECIPES[recipe].build(model, config)
    one_step(model, optimizer, 0)
    projectors = [s["projector"] for s in optimizer.state.values() if "projector" in s]
    assert projectors
    for projector in projectors:
        matrix = projector.ortho_matrix
        assert 4 in matrix.shape
        assert matrix.untyped_storage().nbytes() == matrix.numel() * matrix.element_size()
