"""Measure where training memory goes for every recipe on the same model and data, next to the estimate.

    python launch/memory_report.py --output_dir reports/memory-embedded
    python launch/memory_report.py --output_dir docs/memory/smollm2-2048 --model_name_or_path models/smollm2 \\
        --per_device_train_batch_size 1 --block_size 2048 --gradient_checkpointing --recipes adamw,lomo,adalomo \\
        --chunked_loss both --max_steps 6

Each recipe runs in its own process (`accelerate launch recipes/<name>.py --profile_memory true ...`): step 2 and
the first batch of the final evaluation are profiled with MemTracker; the run reports its whole-run peak (peak RSS
on a CPU, max_memory_allocated on CUDA) and the phase that set it. The folder gets report.md (per recipe: the
step's measured breakdown with the estimate in brackets, the step's and the evaluation's tensor peaks, the run's
peak, s/step), report.json and memory.png (stacked bars by category), plus each run's own output under runs/.
`--chunked_loss both` runs every recipe with the chunked loss and with whole logits, interleaved, to show what the
chunks save and cost. Without --dataset_name the data is a generated corpus sized so that every training step and
the evaluation batch (--per_device_eval_batch_size, default 8 as in the recipes) have full rows.
A report.json already in --output_dir with the same setup keeps its rows of the recipes not in --recipes, so
`--recipes galore` adds or refreshes one recipe's row.
`--scaled_embedded hidden_size=512,num_hidden_layers=8,...` writes a randomly initialised model of the embedded
architecture at that size first and reports on it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from optimizer_recipes.core.data.embedded import generate_corpus, write_scaled_model
from optimizer_recipes.core.memory.estimate import estimate, meta_model
from optimizer_recipes.core.memory.profile import CATEGORIES
from optimizer_recipes.core.optimizers.protocol import all_recipes, reference_recipe
from optimizer_recipes.core.run.metrics import read_metrics, read_results
from optimizer_recipes.core.run.throughput import hardware

REPO = Path(__file__).resolve().parents[2]  # the repository (recipes/measure/<this>.py)
ESTIMATED = ("parameters", "gradients", "optimizer_state", "activations")
LOSSES = {"true": ("chunked",), "false": ("whole",), "both": ("chunked", "whole")}


def write_corpus(path: Path, args) -> int:
    """Generated documents with enough tokens for every training step and one evaluation batch of full rows;
    returns the share of them (%) to hold out for validation."""
    from optimizer_recipes.core.models.sources import load_tokenizer
    from optimizer_recipes.core.optimizers.protocol import recipe_named
    from optimizer_recipes.core.run.config import parse_config

    tokenizer = load_tokenizer(parse_config(recipe_named(reference_recipe()), ["--output_dir", str(path.parent / "unused")] + (
        ["--model_name_or_path", args.model_name_or_path] if args.model_name_or_path else [])))
    sample = generate_corpus(200, seed=11)
    per_document = sum(len(tokenizer(d)["input_ids"]) + 1 for d in sample) / len(sample)
    train_rows = args.max_steps * args.per_device_train_batch_size + 2
    eval_rows = args.per_device_eval_batch_size
    documents = int((train_rows + eval_rows) * args.block_size / per_document * 1.25) + 50
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in generate_corpus(documents, seed=11)))
    return max(1, min(50, round(100 * (eval_rows + 0.5) / (train_rows + eval_rows))))


def run_recipe(name: str, loss: str, args, out: Path) -> dict:
    config = args.config_file or ("single_gpu.yaml" if torch.cuda.is_available() else "cpu.yaml")
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(REPO / "accelerate_configs" / config),
           str(REPO / "recipes" / f"{name}.py"), "--profile_memory", "true", "--max_steps", str(args.max_steps),
           "--save_steps", "0", "--logging_steps", "1", "--per_device_train_batch_size",
           str(args.per_device_train_batch_size), "--per_device_eval_batch_size", str(args.per_device_eval_batch_size),
           "--block_size", str(args.block_size), "--output_dir", str(out), "--overwrite_output_dir", "true",
           "--chunked_loss", "true" if loss == "chunked" else "false", "--dataset_name", args.dataset_name,
           "--gradient_checkpointing", "true" if args.gradient_checkpointing else "false"]
    if args.validation_split_percentage:
        cmd += ["--validation_split_percentage", str(args.validation_split_percentage)]
    if args.model_name_or_path:
        cmd += ["--model_name_or_path", args.model_name_or_path]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    profile = json.loads((out / "memory_profile.json").read_text())
    results, logged = read_results(out), read_metrics(out)
    steps = [r["seconds_per_step"] for r in logged if "seconds_per_step" in r and r["step"] > 2]  # after the
    return {"measured": profile, "run": {k: v for k, v in results.items() if k.startswith("run_peak")},  # profiled
            "seconds_per_step": statistics.median(steps) if steps else None}


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def write_report(folder: Path, rows: dict, setup: str) -> None:
    baseline = next((row for row in rows.values() if row["recipe"] == reference_recipe()), next(iter(rows.values())))
    baseline_peak = baseline["measured"]["run_peak_bytes"]
    peak_key = next(k for k in next(iter(rows.values()))["run"] if k != "run_peak_phase")
    lines = ["# Training memory by optimizer", "", setup, "",
             "Measured in MiB, estimate in brackets (`launch/estimate_memory.py`). Categories: the largest each "
             "reached during the profiled training step (optimizer state: what is held after the step; its "
             "transient buffers count in the peak). Step and evaluation peaks: the tensors alive at once at their "
             "largest (MemTracker), in the training step and in one evaluation batch; run: the larger of the two, "
             f"against `adamw`'s. Process peak: {peak_key.removeprefix('run_')} over the whole run (loading, "
             "training, evaluation, saving) and the phase that set it. s/step: median over the steps after the "
             "profiled one.", "",
             "| recipe | loss | " + " | ".join(ESTIMATED) + " | temporaries | step peak | evaluation peak | run | "
             "vs adamw | process peak (GiB) | s/step |",
             "|---|---|" + "---:|" * (len(ESTIMATED) + 7)]
    for key, row in rows.items():
        measured, estimated = row["measured"], row["estimate"]
        cells = [f"{mib(measured['breakdown'][c])} ({mib(estimated[c])})" for c in ESTIMATED]
        evaluation = measured["evaluation"]["peak_bytes"]
        run_peak = measured["run_peak_bytes"]
        seconds = f"{row['seconds_per_step']:.2f}" if row["seconds_per_step"] else "-"
        lines.append(f"| `{row['recipe']}` | {row['loss']} | " + " | ".join(cells)
                     + f" | {mib(measured['breakdown']['temporaries'])} | {mib(measured['peak_bytes'])} "
                     f"({mib(estimated['training'])}) | {mib(evaluation)} ({mib(estimated['evaluation'])}) | "
                     f"{mib(run_peak)} ({mib(estimated['total'])}) | {run_peak / baseline_peak:.2f}x | "
                     f"{row['run'][peak_key]:.2f} ({row['run']['run_peak_phase']}) | {seconds} |")
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
    ax.scatter(names, [rows[n]["measured"]["evaluation"]["peak_bytes"] / 2**20 for n in names], color="black",
               marker="_", s=600, label="evaluation peak", zorder=3)
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
    parser.add_argument("--model_name_or_path", default=None, help="a local folder or .gguf file")
    parser.add_argument("--scaled_embedded", default=None, help="e.g. hidden_size=512,num_hidden_layers=8")
    parser.add_argument("--dataset_name", default=None, help="default: a generated corpus sized for the run")
    parser.add_argument("--per_device_train_batch_size", type=int, default=8)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--max_steps", type=int, default=3)
    parser.add_argument("--chunked_loss", choices=tuple(LOSSES), default="true",
                        help="both: each recipe with the chunked loss and with whole logits")
    parser.add_argument("--config_file", default=None, help="an accelerate_configs/ file; default cpu or single_gpu")
    parser.add_argument("--recipes", default=",".join(r.name for r in all_recipes()))
    args = parser.parse_args(argv)
    if args.max_steps < 2:
        parser.error("--max_steps must be at least 2: step 2 is the profiled one")
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if args.scaled_embedded:
        overrides = dict(item.split("=") for item in args.scaled_embedded.split(","))
        args.model_name_or_path = str(write_scaled_model(folder / "model", **overrides))
    args.validation_split_percentage = None
    if args.dataset_name is None:
        args.dataset_name = str(folder / "corpus.jsonl")
        args.validation_split_percentage = write_corpus(folder / "corpus.jsonl", args)

    model = meta_model(args.model_name_or_path)
    params = sum(p.numel() for p in model.parameters())
    setup = (f"{args.model_name_or_path or 'embedded tiny Llama'} ({params / 1e6:.2f}M parameters), fp32, "
             f"micro-batch {args.per_device_train_batch_size} x {args.block_size} tokens, evaluation batch "
             f"{args.per_device_eval_batch_size}, gradient checkpointing "
             f"{'on' if args.gradient_checkpointing else 'off'}"
             f", one process on {hardware()}")
    wanted = args.recipes.split(",")
    rows = earlier_rows(folder, setup, wanted)
    for recipe in all_recipes():
        if recipe.name not in wanted:
            continue
        for loss in LOSSES[args.chunked_loss]:
            key = recipe.name if args.chunked_loss != "both" else f"{recipe.name}, {loss}"
            measured = run_recipe(recipe.name, loss, args, folder / "runs" / key.replace(", ", "-"))
            rows[key] = {"recipe": recipe.name, "loss": loss, **measured, "estimate": estimate(
                recipe, model, "fp32", args.per_device_train_batch_size, args.block_size,
                args.gradient_checkpointing, eval_batch=args.per_device_eval_batch_size,
                chunked_loss=loss == "chunked").as_dict()}
            print(f"{key}: step peak {mib(measured['measured']['peak_bytes'])} MiB, run peak "
                  f"{mib(measured['measured']['run_peak_bytes'])} MiB", flush=True)
    order = [r.name for r in all_recipes()]
    write_report(folder, dict(sorted(rows.items(), key=lambda item: order.index(item[1]["recipe"]))), setup)
    print(f"wrote {folder / 'report.md'} and {folder / 'memory.png'}")


def earlier_rows(folder: Path, setup: str, rerun: list[str]) -> dict:
    """The rows of an earlier report in this folder with the same setup, but for the recipes measured again: a
    report gains or refreshes recipes without measuring the others again."""
    path = folder / "report.json"
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    if earlier["setup"] != setup:
        return {}
    return {key: row for key, row in earlier["recipes"].items() if row["recipe"] not in rerun}


if __name__ == "__main__":
    main()
