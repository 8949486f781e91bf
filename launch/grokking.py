"""Does GrokAdamW grok sooner than AdamW? A modular-arithmetic comparison that anyone can rerun on a CPU.

The programme is recipes/measure/grokking.py (`python launch/grokking.py --help` says how to run it).
"""

from optimizer_recipes.measure.grokking import main

if __name__ == "__main__":
    main()
