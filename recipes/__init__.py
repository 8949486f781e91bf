"""Fine-tuning recipes for specialised optimizers, one script each, sharing one Accelerate loop (recipes.core)."""

import sys
from pathlib import Path

# `python recipes/grokadamw.py` puts recipes/ first on sys.path, where recipes/grokadamw.py would shadow the
# grokadamw package (and every recipe would be importable under a bare name). Drop that entry.
_here = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if not p or str(Path(p).resolve()) != _here]
