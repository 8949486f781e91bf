"""LOMO's headline at its real scale: a model of a published shape fully fine-tuned through the whole run (load,.

The programme is recipes/measure/scale_run.py (`python launch/scale_run.py --help` says how to run it).
"""

from optimizer_recipes.measure.scale_run import main

if __name__ == "__main__":
    main()
