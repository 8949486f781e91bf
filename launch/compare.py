"""Compare finished runs side by side: loss, evaluation, throughput and peak memory, from their output folders.

The programme is recipes/measure/compare.py (`python launch/compare.py --help` says how to run it).
"""

from optimizer_recipes.measure.compare import main

if __name__ == "__main__":
    main()
