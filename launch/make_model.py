"""Write a random-weight model of a published shape, without a download: for memory and speed at real scale.

The programme is recipes/measure/make_model.py (`python launch/make_model.py --help` says how to run it).
"""

from optimizer_recipes.measure.make_model import main

if __name__ == "__main__":
    main()
