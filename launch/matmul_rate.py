"""This machine's dense matmul rates, fp32 against bf16: what MFU on a CPU is measured against, and why bf16 pays.

The programme is recipes/measure/matmul_rate.py (`python launch/matmul_rate.py --help` says how to run it).
"""

from optimizer_recipes.measure.matmul_rate import main

if __name__ == "__main__":
    main()
