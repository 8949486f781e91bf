"""Run the README's test command, time it, and write where the time goes into the docs.

The programme is recipes/measure/suite_time.py (`python launch/suite_time.py --help` says how to run it).
"""

from optimizer_recipes.measure.suite_time import main

if __name__ == "__main__":
    main()
