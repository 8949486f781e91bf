"""fp32 against bf16 on the same run: s/step and eval loss of a recipe with `--bf16 false` and `--bf16 true`.

The programme is recipes/measure/precision_speed.py (`python launch/precision_speed.py --help` says how to run it).
"""

from optimizer_recipes.measure.precision_speed import main

if __name__ == "__main__":
    main()
