"""With --model_name_or_path and no --learning_rate, each recipe uses its fine-tuning default, and says so."""

from __future__ import annotations

import pytest
import yaml
from optimizer_recipes.core.optimizers.protocol import all_recipes
from optimizer_recipes.core.run.config import parse_config

from tests.conftest import results, run_here, shared_output, train_losses

RECIPES = {r.name: r for r in all_recipes()}


@pytest.mark.parametrize("name", RECIPES)
def test_learning_rate_default_depends_on_whether_the_model_is_pretrained(name, tmp_path):
    recipe = RECIPES[name]
    scratch = parse_config(recipe, ["--output_dir", str(tmp_path / "a")])
    pretrained = parse_config(recipe, ["--model_name_or_path", "some/model", "--output_dir", str(tmp_path / "b")])
    given = parse_config(recipe, ["--model_name_or_path", "some/model", "--learning_rate", "3e-4",
                                  "--output_dir", str(tmp_path / "c")])
    assert scratch.train.learning_rate == recipe.default_learning_rate
    assert pretrained.train.learning_rate == recipe.fine_tuning_learning_rate < recipe.default_learning_rate
    assert given.train.learning_rate == 3e-4 and "learning_rate" not in given.defaults_used
    assert "default for fine-tuning a pretrained model" in pretrained.defaults_used["learning_rate"]
    assert short(recipe.fine_tuning_learning_rate) in recipe.description  # with its source


def short(value: float) -> str:
    """2e-05 -> 2e-5, 0.00015 -> 1.5e-4: as the docstrings write them."""
    mantissa, exponent = f"{value:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


@pytest.fixture(scope="module")
def pretrained_folder(tmp_path_factory):
    """A local model folder as from_pretrained reads it: the embedded model after some training."""
    return shared_output(tmp_path_factory, "pretrained", lambda out: run_here(
        "adamw", "--max_steps", "60", "--logging_steps", "20", "--output_dir", str(out), "--overwrite_output_dir"))


@pytest.mark.parametrize("name", ["lomo", "adalomo"])
def test_fine_tuning_a_local_model_with_the_default_lr_does_not_blow_up(name, pretrained_folder, tmp_path):
    """The from-scratch defaults (lomo 0.5, adalomo 0.1) sent a pretrained model's loss from 6 to 54; the fine-tuning
    defaults keep it falling (lomo) or at least not rising (adalomo, whose steps are relative to each weight)."""
    out = tmp_path / "out"
    proc = run_here(name, "--model_name_or_path", str(pretrained_folder), "--max_steps", "10", "--logging_steps", "1",
                  "--output_dir", str(out))
    expected_lr = RECIPES[name].fine_tuning_learning_rate
    assert f"--learning_rate {expected_lr:g}, the {name} recipe's default for fine-tuning" in proc.stdout
    resolved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert resolved["learning_rate"] == expected_lr and "fine-tuning" in resolved["defaults_used"]["learning_rate"]
    losses = train_losses(out)
    assert max(losses) < 1.02 * losses[0]
    assert results(out)["eval_loss"] <= results(pretrained_folder)["eval_loss"] * 1.005
    if name == "lomo":
        assert sum(losses[-3:]) < sum(losses[:3])
