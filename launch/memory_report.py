"""Measure where training memory goes for every recipe on the same model and data, next to the estimate.

    python launch/memory_report.py --output_dir reports/memory-embedded
    python launch/memory_report.py --output_dir reports/memory-llama --model_name_or_path <hub id or folder> \\
        --per_device_train_batch_size 1 --block_size 512

Each recipe runs in its own process (`accelerate launch recipes/<name>.py --profile_memory true ...`) for a few
steps; its step profile is read back. The folder gets report.md (measured breakdown and peak per optimizer, the
estimate beside each figure, the ratio to AdamW), report.json, and memory.png (a stacked bar chart by category),
plus each run's own output under runs/. `--scaled_embedded hidden_size=512,num_hidden_layers=8,...` writes a
randomly initialised model of the embedded architecture at that size first and reports on it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from recipes.core.embedded import write_scaled_model
from recipes.core.memory import CATEGORIES
from recipes.core.memory_estimate import estimate, meta_model
from recipes.core.optimizer_recipe import all_recipes

REPO = Path(__file__).resolve().parent.parent
ESTIMATED = ("parameters", "gradients", "optimizer_state", "activations")


def run_recipe(name: str, args, out: Path) -> dict:
    config = args.config_file or ("single_gpu.yaml" if torch.cuda.is_available() else "cpu.yaml")
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(REPO / "accelerate_configs" / config),
           str(REPO / "recipes" / f"{name}.py"), "--profile_memory", "true", "--max_steps", str(args.max_steps),
           "--save_steps", "0", "--logging_steps", "1", "--per_device_train_batch_size",
           str(args.per_device_train_batch_size), "--block_size", str(args.block_size), "--output_dir", str(out),
           "--overwrite_output_dir", "true"]
    if args.model_name_or_path:
        cmd += ["--model_name_or_path", args.model_name_or_path]
    if args.dataset_name:
        cmd += ["--dataset_name", args.dataset_name]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    return json.loads((out / "memory_profile.json").read_text())


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def write_report(folder: Path, rows: dict, setup: str) -> None:
    adamw_peak = rows["adamw"]["measured"]["peak_bytes"]
    lines = ["# Training memory by optimizer", "", setup, "",
             "Measured in MiB, estimate in brackets: the largest each category reached during the profiled step "
             "(optimizer state: what is held after the step; its transient buffers count in the peak). Peak: the "
             "step's measured peak. Ratio: peak / AdamW's peak.", "",
             "| recipe | " + " | ".join(ESTIMATED) + " | temporaries | peak | vs adamw |",
             "|---|" + "---:|" * (len(ESTIMATED) + 3)]
    for name, row in rows.items():
        measured, estimated = row["measured"]["breakdown"], row["estimate"]
        cells = [f"{mib(measured[c])} ({mib(estimated[c])})" for c in ESTIMATED]
        peak = row["measured"]["peak_bytes"]
        lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {mib(measured['temporaries'])} | {mib(peak)} | "
                     f"{peak / adamw_peak:.2f}x |")
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    (folder / "report.json").write_text(json.dumps({"setup": setup, "recipes": rows}, indent=2) + "\n")
    plot(folder / "memory.png", rows, setup)


def plot(path: Path, rows: dict, setup: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(10, 5))
    bottom = [0.0] * len(names)
    for cat in CATEGORIES:
        values = [rows[n]["measured"]["at_peak"][cat] / 2**20 for n in names]
        ax.bar(names, values, bottom=bottom, label=cat.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("MiB at the step's peak")
    ax.set_title(setup, fontsize=8, wrap=True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--model_name_or_path", default=None)
    parser.add_argument("--scaled_embedded", default=None, help="e.g. hidden_size=512,num_hidden_layers=8")
    parser.add_argument("--dataset_name", default=None)
    parser.add_argument("--per_device_train_batch_size", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--max_steps", type=int, default=3)
    parser.add_argument("--config_file", default=None, help="an accelerate_configs/ file; default cpu or single_gpu")
    parser.add_argument("--recipes", default=",".join(r.name for r in all_recipes()))
    args = parser.parse_args(argv)
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if args.scaled_embedded:
        overrides = dict(item.split("=") for item in args.scaled_embedded.split(","))
        args.model_name_or_path = str(write_scaled_model(folder / "model", **overrides))

    model = meta_model(args.model_name_or_path)
    params = sum(p.numel() for p in model.parameters())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    setup = (f"{args.model_name_or_path or 'embedded tiny Llama'} ({params / 1e6:.2f}M parameters), fp32, "
             f"micro-batch {args.per_device_train_batch_size} x {args.block_size} tokens, one process on {device}")
    wanted = args.recipes.split(",")
    rows = {}
    for recipe in all_recipes():
        if recipe.name not in wanted:
            continue
        measured = run_recipe(recipe.name, args, folder / "runs" / recipe.name)
        rows[recipe.name] = {"measured": measured, "estimate": estimate(
            recipe, model, "fp32", args.per_device_train_batch_size, args.block_size).as_dict()}
        print(f"{recipe.name}: peak {mib(measured['peak_bytes'])} MiB", flush=True)
    write_report(folder, rows, setup)
    print(f"wrote {folder / 'report.md'} and {folder / 'memory.png'}")


if __name__ == "__main__":
    main()
