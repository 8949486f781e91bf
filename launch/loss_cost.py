"""What the chunked loss costs, or saves, in time: one training step's forward and backward with each loss,
interleaved.

The programme is recipes/measure/loss_cost.py (`python launch/loss_cost.py --help` says how to run it).
"""

from optimizer_recipes.measure.loss_cost import main

if __name__ == "__main__":
    main()
