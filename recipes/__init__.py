"""Fine-tuning recipes for specialised optimizers, one script each, sharing one Accelerate loop (core/).

Installed as the package `optimizer_recipes` (pyproject.toml maps it onto this folder), a name nothing else on the
path takes: torchtune, for one, installs a top-level package named `recipes`."""

import os
import signal
import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
# `python recipes/grokadamw.py` puts recipes/ first on sys.path, where recipes/grokadamw.py would shadow the
# grokadamw package (and every recipe would be importable under a bare name). Drop that entry.
sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != _here]


def _interrupted_while_starting(signum, frame) -> None:
    """Ctrl-C while a recipe imports torch and transformers (seconds): one line, not a traceback from an import.
    The run's own handlers (recipes/core/run/preemption.py) take over once it starts."""
    print(f"{Path(sys.argv[0]).stem}: SIGINT received before the first step: nothing to save, stopped (nothing "
          "written to --output_dir); rerun the same command to start", file=sys.stderr)
    os._exit(128 + signal.SIGINT)


if sys.argv and sys.argv[0] and Path(sys.argv[0]).resolve().parent == _here:  # a recipe script is the programme
    signal.signal(signal.SIGINT, _interrupted_while_starting)
