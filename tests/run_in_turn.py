"""Several recipe runs in one launch, one after another, for the tests:

    PYTHONPATH=. accelerate launch --config_file accelerate_configs/<file> tests/run_in_turn.py RUNS.json

RUNS.json lists the runs, `[{"recipe": "<name>", "args": ["--output_dir", ..., ...]}, ...]`. Each run is what
`accelerate launch ... recipes/<name>.py <args>` does in these processes (the recipe's own `train` on its parsed
command line), with a line `=== run <i>: <name> ===` before its output. Between runs accelerate's process-wide
state is reset and the process group the launcher started is kept (accelerate would destroy it at the end of each
run). A launch costs 8-20 s of start-up here and a test run about a second, so the tests run a config file's working
cells in one launch (tests/test_distributed.py).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

RUN_MARKER = re.compile(r"=== run (\d+): \S+ ===")


def main(runs_file: str) -> None:
    import torch.distributed as dist
    from accelerate.state import PartialState
    from optimizer_recipes.core.optimizers.protocol import all_recipes
    from optimizer_recipes.core.run.config import parse_config
    from optimizer_recipes.core.run.loop import exit_before_interpreter_teardown, train

    from tests.conftest import reset_accelerate_state

    PartialState.destroy_process_group = lambda self, group=None: None  # the next run joins the same group
    recipes = {r.name: r for r in all_recipes()}
    for index, run in enumerate(json.loads(Path(runs_file).read_text())):
        for stream in (sys.stdout, sys.stderr):  # on a line of its own, also after a progress bar's last update
            print(f"\n=== run {index}: {run['recipe']} ===", file=stream, flush=True)
        recipe = recipes[run["recipe"]]
        train(recipe, parse_config(recipe, run["args"]))
        reset_accelerate_state()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    exit_before_interpreter_teardown()


def outputs_of_each_run(text: str) -> dict[int, str]:
    """A launch's stdout (or stderr) split into each run's part, by run index."""
    parts, index = {}, None
    for line in text.splitlines(keepends=True):
        marker = RUN_MARKER.fullmatch(line.strip())
        if marker:  # each process prints it
            index = int(marker.group(1))
            parts.setdefault(index, "")
        elif index is not None:
            parts[index] += line
    return parts


if __name__ == "__main__":
    main(sys.argv[1])
