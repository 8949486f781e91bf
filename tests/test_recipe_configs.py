"""recipes/configs/: one real chat fine-tune per recipe; each file loads through its recipe's own parser."""

from __future__ import annotations

import pytest
import yaml
from optimizer_recipes.core.optimizers.protocol import all_recipes, recipe_names
from optimizer_recipes.core.run.config import ConfigError, parse_config

from tests.conftest import REPO

RECIPES = {r.name: r for r in all_recipes()}
CONFIGS = REPO / "recipes" / "configs"


@pytest.mark.parametrize("name", recipe_names())
def test_each_recipe_has_a_chat_config_that_its_parser_accepts(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # output_dir is relative: nothing lands in the repo
    path = CONFIGS / f"{name}_chat_0.5b.yaml"
    values = yaml.safe_load(path.read_text())
    config = parse_config(RECIPES[name], ["--config", str(path)])
    assert config.model.model_name_or_path == values["model_name_or_path"] == "Qwen/Qwen2.5-0.5B"
    assert config.data.dataset_name == "trl-lib/Capybara" and config.data.dataset_test_split == "test"
    # the file's, else (the memory savers) the recipe's fine-tuning default, which their sweep chose at their rank and scale
    assert config.train.learning_rate == values.get("learning_rate", RECIPES[name].fine_tuning_learning_rate)
    assert config.train.bf16 and config.train.gradient_checkpointing
    assert f"recipes/{name}.py --config recipes/configs/{path.name}" in path.read_text()  # the command in the file


def test_an_unknown_key_in_a_config_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "adalomo_chat_0.5b.yaml").read_text() + "learnig_rate: 1e-3\n")
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config(RECIPES["adalomo"], ["--config", str(bad)])
