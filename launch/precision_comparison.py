"""bf16 weights against fp32 weights on the fine-tuning comparison's task: what rounding each update to nearest.

The programme is recipes/measure/precision_comparison.py (`python launch/precision_comparison.py --help` says how to
run it).
"""

from optimizer_recipes.measure.precision_comparison import main

if __name__ == "__main__":
    main()
