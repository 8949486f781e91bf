"""Which recipe runs under which accelerate config file, from the recipes' own refusals.

`python -m optimizer_recipes.core.optimizers.compatibility` prints the Markdown tables the README shows (written there by
recipes/measure/doc_blocks.py, and checked by tests/test_docs.py); tests/test_distributed.py and
tests/test_in_backward.py launch every cell, so the tables cannot drift from the code.
"""

from __future__ import annotations

from optimizer_recipes.core.memory.check import CONFIG_DIR
from optimizer_recipes.core.optimizers.protocol import OptimizerRecipe, all_recipes
from optimizer_recipes.core.run.config import Config, DataArguments, ModelArguments, TrainArguments
from optimizer_recipes.core.run.launch_setup import LaunchSetup

DISTRIBUTED_CONFIGS = ("multi_gpu.yaml", "zero2.yaml", "zero3.yaml", "zero3_offload.yaml", "fsdp2.yaml")


def refusal(recipe: OptimizerRecipe, config_file: str, in_backward: bool = False) -> str | None:
    """The recipe's start-up refusal under this config file with default flags (and --optimizer_in_backward if
    asked), or None if it runs."""
    config = Config(ModelArguments(), DataArguments(), TrainArguments(optimizer_in_backward=in_backward),
                    recipe.arguments_class()(), recipe=recipe.name, launch=launch_setup(config_file))
    recipe = recipe.for_run(config)
    recipe.fill_defaults(config)
    return recipe.refuse(config)


def launch_setup(config_file: str) -> LaunchSetup:
    return LaunchSetup.from_accelerate_config(CONFIG_DIR / config_file)


def markdown_table(in_backward: bool = False) -> str:
    """The README's table: every recipe under every distributed config file; with `in_backward`, the recipes whose
    update is per tensor, run with --optimizer_in_backward true."""
    header = "| recipe | " + " | ".join(f"`{c}`" for c in DISTRIBUTED_CONFIGS) + " |"
    rows = [header, "|---|" + "---|" * len(DISTRIBUTED_CONFIGS)]
    reasons: dict[str, int] = {}
    for recipe in all_recipes():
        if in_backward and recipe.updates_in_backward:
            continue
        cells = []
        for config_file in DISTRIBUTED_CONFIGS:
            reason = refusal(recipe, config_file, in_backward)
            if reason is None:
                cells.append("works")
            else:
                setup = launch_setup(config_file)
                key = "<recipe>" + reason.removeprefix(recipe.name) if reason.startswith(recipe.name) else reason
                if setup.kind == "deepspeed":  # one note for the same reason under every ZeRO stage
                    key = key.replace(f"under {setup.describe()}", "under DeepSpeed ZeRO")
                number = reasons.setdefault(key, len(reasons) + 1)
                cells.append(f"refused ({number})")
        rows.append(f"| `{recipe.name}` | " + " | ".join(cells) + " |")
    notes = [f"{n}. {reason}" for reason, n in reasons.items()]
    return "\n".join(rows) + "\n\n" + "\n".join(notes) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
    print("\nWith --optimizer_in_backward true:\n")
    print(markdown_table(in_backward=True), end="")
