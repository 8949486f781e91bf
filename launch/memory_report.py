"""Measure where training memory goes for every recipe on the same model and data, next to the estimate.

The programme is recipes/measure/memory_report.py (`python launch/memory_report.py --help` says how to run it).
"""

from optimizer_recipes.measure.memory_report import main

if __name__ == "__main__":
    main()
