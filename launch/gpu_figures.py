"""The GPU figures: recipes on one GPU at real shapes, each run's speed and CUDA peak beside the estimate.

The programme is recipes/measure/gpu_figures.py (`python launch/gpu_figures.py --help` says how to run it).
"""

from optimizer_recipes.measure.gpu_figures import main

if __name__ == "__main__":
    main()
