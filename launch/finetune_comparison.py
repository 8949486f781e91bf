"""Fine-tune a real pretrained chat model with each recipe on the same instruction task, and compare.

The programme is recipes/measure/finetune_comparison.py (`python launch/finetune_comparison.py --help` says how to
run it).
"""

from optimizer_recipes.measure.finetune_comparison import main

if __name__ == "__main__":
    main()
