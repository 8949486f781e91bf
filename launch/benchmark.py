"""Speed and memory of each optimizer in three harnesses: a bare PyTorch loop, the recipe, the Transformers Trainer.

The programme is recipes/measure/benchmark.py (`python launch/benchmark.py --help` says how to run it).
"""

from optimizer_recipes.measure.benchmark import main

if __name__ == "__main__":
    main()
