"""Which recipe runs under which accelerate config file, from the recipes' own refusals.

`python -m optimizer_recipes.core.compatibility` prints the Markdown table the README shows; tests/test_distributed.py checks
that the README holds exactly this table and launches every cell, so the table cannot drift from the code.
"""

from __future__ import annotations


from optimizer_recipes.core.config import Config, DataArguments, ModelArguments, OptimizerArguments, TrainArguments
from optimizer_recipes.core.launch_setup import LaunchSetup
from optimizer_recipes.core.memory_check import CONFIG_DIR
from optimizer_recipes.core.optimizer_recipe import OptimizerRecipe, all_recipes
DISTRIBUTED_CONFIGS = ("multi_gpu.yaml", "zero2.yaml", "zero3.yaml", "zero3_offload.yaml", "fsdp2.yaml")


def refusal(recipe: OptimizerRecipe, config_file: str) -> str | None:
    """The recipe's start-up refusal under this config file with default flags, or None if it runs."""
    config = Config(ModelArguments(), DataArguments(), TrainArguments(), OptimizerArguments(), recipe=recipe.name,
                    launch=launch_setup(config_file))
    recipe.fill_defaults(config)
    return recipe.refuse(config)


def launch_setup(config_file: str) -> LaunchSetup:
    return LaunchSetup.from_accelerate_config(CONFIG_DIR / config_file)


def markdown_table() -> str:
    header = "| recipe | " + " | ".join(f"`{c}`" for c in DISTRIBUTED_CONFIGS) + " |"
    rows = [header, "|---|" + "---|" * len(DISTRIBUTED_CONFIGS)]
    reasons: dict[str, int] = {}
    for recipe in all_recipes():
        cells = []
        for config_file in DISTRIBUTED_CONFIGS:
            reason = refusal(recipe, config_file)
            if reason is None:
                cells.append("works")
            else:
                setup = launch_setup(config_file)
                key = "<recipe>" + reason.removeprefix(recipe.name)
                if setup.kind == "deepspeed":  # one note for the same reason under every ZeRO stage
                    key = key.replace(f"under {setup.describe()}", "under DeepSpeed ZeRO")
                number = reasons.setdefault(key, len(reasons) + 1)
                cells.append(f"refused ({number})")
        rows.append(f"| `{recipe.name}` | " + " | ".join(cells) + " |")
    notes = [f"{n}. {reason}" for reason, n in reasons.items()]
    return "\n".join(rows) + "\n\n" + "\n".join(notes) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
