"""This machine's dense matmul rates, fp32 against bf16: what MFU on a CPU is measured against, and why bf16 pays.

    python launch/matmul_rate.py                       # all cores; sizes 1024, 2048, 4096 and 2048 x 4096 x 4096
    python launch/matmul_rate.py --threads 1 --output rates.json

Every (size, dtype) gets its operands and one warm-up call first; then rounds interleave the dtypes (fp32, bf16,
fp32, bf16, ...), one timed call each. The table gives the median GFLOP/s over rounds and the median of each round's
bf16 / fp32 ratio (the machine may be shared: a round's ratio is what to trust). Recipes measure the 1024^3 case at
start-up in their compute dtype (recipes/core/run/throughput.py) and log MFU against it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository (recipes/measure/<this>.py)

DEFAULT_SIZES = "1024,2048,4096,2048x4096x4096"


def parse_shape(text: str) -> tuple[int, int, int]:
    """A size: N is N x N x N; MxKxN is (M x K) @ (K x N)."""
    parts = [int(x) for x in text.split("x")]
    if len(parts) not in (1, 3):
        raise argparse.ArgumentTypeError(f"{text!r}: a size is N or MxKxN")
    return tuple(parts * 3) if len(parts) == 1 else tuple(parts)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated N (N x N x N) or MxKxN")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads (default: every core this process may run on)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", default=None, help="write the measurements as JSON here")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from optimizer_recipes.core.run.throughput import CpuMatmul, hardware

    torch.set_num_threads(args.threads)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    rows, lines = [], []
    for shape in (parse_shape(text) for text in args.sizes.split(",")):
        matmuls = {name: CpuMatmul(dtype, shape) for name, dtype in dtypes.items()}
        for matmul in matmuls.values():
            matmul.seconds()  # warm-up
        rates = {name: [] for name in dtypes}
        for round_ in range(args.rounds):
            for name in list(dtypes) if round_ % 2 == 0 else list(reversed(dtypes)):
                rates[name].append(matmuls[name].flops / matmuls[name].seconds() / 1e9)
        ratio = statistics.median(b / f for f, b in zip(rates["fp32"], rates["bf16"]))
        rows += [{"shape": list(shape), "dtype": name, "gflops": statistics.median(rates[name]),
                  "rounds": rates[name]} for name in dtypes]
        lines.append(f"| {' x '.join(map(str, shape))} | {statistics.median(rates['fp32']):,.0f} | "
                     f"{statistics.median(rates['bf16']):,.0f} | {ratio:.2f} |")
        del matmuls
    print(f"{hardware()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}; (m x k) @ (k x n), "
          f"median GFLOP/s of {args.rounds} interleaved rounds after a warm-up call\n\n"
          "| m x k x n | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 (median of rounds) |\n|---|---:|---:|---:|")
    print("\n".join(lines))
    if args.output:
        Path(args.output).write_text(json.dumps({"hardware": hardware(), "threads": torch.get_num_threads(),
                                                 "torch": torch.__version__, "rounds": args.rounds, "rows": rows},
                                                indent=2) + "\n")


if __name__ == "__main__":
    main()
