"""The GPU figures: recipes on one GPU at real shapes, each run's speed and CUDA peak beside the estimate.

    python launch/gpu_figures.py --output_dir docs/benchmark/gpu

One process per case, `accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/<recipe>.py`, on
random-weight models of published shapes written by `launch/make_model.py` (figures of speed and memory, never of
quality), trained on the embedded corpus (repeated to fill the steps):
- a ~1B shape (Llama-3.2-1B): adamw and adalomo under bf16 autocast (fp32 weights), adalomo in bf16 weights,
  adamw with `--torch_compile true`, and adamw with eager attention against the default sdpa;
- LLaMA-7B's shape in bf16 weights with gradient checkpointing at the LOMO paper's 8 x 512 (its Table 1): lomo and
  adalomo, the CUDA peak beside the estimate and the paper's figure.
Per case: the median s/step and tokens/s after the warm-up steps, MFU (against the GPU's dense bf16 peak,
recipes/core/run/throughput.py), the run's CUDA peak allocated (max over every phase), and the estimator's run peak for
the same setting (recipes/core/memory/estimate.py). The report is rewritten after every case (report.md,
report.json), so a run cut short keeps what it measured; `--cases` picks cases by name, `--budget_s` stops starting
new ones when the time left would not cover them. Run folders are deleted after each case is read.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from optimizer_recipes.core.run.metrics import read_metrics, read_results

REPO = Path(__file__).resolve().parents[2]  # the repository (recipes/measure/<this>.py)

BF16_AUTOCAST = ["--bf16", "true"]
BF16_WEIGHTS = ["--dtype", "bfloat16"]
# (name, recipe, model, flags, steps, expected seconds): the order is the order of value, the budget cuts the tail
CASES = (
    ("adamw-1b", "adamw", "small", BF16_AUTOCAST, 16, 60),
    ("adalomo-1b", "adalomo", "small", BF16_AUTOCAST, 16, 60),
    ("lomo-7b", "lomo", "large", BF16_WEIGHTS + ["--gradient_checkpointing", "true"], 7, 120),
    ("adalomo-7b", "adalomo", "large", BF16_WEIGHTS + ["--gradient_checkpointing", "true"], 7, 100),
    ("adamw-1b-compiled", "adamw", "small", BF16_AUTOCAST + ["--torch_compile", "true"], 24, 120),
    ("adalomo-1b-bf16-weights", "adalomo", "small", BF16_WEIGHTS, 16, 50),
    ("adamw-1b-eager-attention", "adamw", "small", BF16_AUTOCAST + ["--attn_implementation", "eager"], 16, 60),
)
WARMUP_STEPS = 3  # the first steps (allocator growth, kernel selection, compilation) are not timed


def write_corpus(path: Path, repeats: int) -> int:
    from optimizer_recipes.core.data.embedded import train_documents

    documents = train_documents() * repeats
    path.write_text("".join(doc + "\n" for doc in documents))
    return len(documents)


def case_command(recipe: str, model: Path, data: Path, out: Path, flags: list[str], steps: int, batch: int,
                 block: int, config: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs" / config),
            str(REPO / "recipes" / f"{recipe}.py"), "--model_name_or_path", str(model), "--dataset_name", str(data),
            "--per_device_train_batch_size", str(batch), "--per_device_eval_batch_size", str(batch),
            "--block_size", str(block), "--max_steps", str(steps), "--logging_steps", "1", "--save_steps", "0",
            "--validation_split_percentage", "1", "--output_dir", str(out), *flags]


def precision_of(flags: list[str]) -> str:
    if "--dtype" in flags:
        return "bf16"
    return "bf16-mixed" if "--bf16" in flags else "fp32"


def estimated_gib(recipe_name: str, model: Path, flags: list[str], batch: int, block: int) -> float:
    from optimizer_recipes.core.memory.estimate import estimate, meta_model
    from optimizer_recipes.core.optimizers.protocol import all_recipes
    from transformers import AutoConfig

    recipe = next(r for r in all_recipes() if r.name == recipe_name)
    e = estimate(recipe, meta_model(None, config=AutoConfig.from_pretrained(model)), precision_of(flags), batch,
                 block, "--gradient_checkpointing" in flags, eval_batch=batch)
    return e.total / 2**30


def measured(out: Path) -> dict:
    results, steps = read_results(out), read_metrics(out)
    timed = [r for r in steps if "seconds_per_step" in r][WARMUP_STEPS:]
    median = (lambda key: statistics.median(r[key] for r in timed)) if timed else (lambda key: None)
    return {"seconds_per_step": median("seconds_per_step"), "tokens_per_s": median("tokens_per_s"),
            "mfu_median": median("mfu") if timed and "mfu" in timed[0] else None, "results": results}


def report(header: dict, rows: list[dict]) -> str:
    lines = [f"# Recipes on one GPU: {header['gpu']}", "",
             f"Measured {header['date']} with `python launch/gpu_figures.py` (torch {header['torch']}, transformers "
             f"{header['transformers']}, accelerate {header['accelerate']}); one process "
             "(`accelerate_configs/single_gpu.yaml`), random-weight models of published shapes (speed and memory, not "
             f"quality), the embedded corpus. s/step, tokens/s and MFU: medians after the first {WARMUP_STEPS} steps; "
             "MFU against the GPU's dense bf16 peak; peak: CUDA's max allocated over the whole run (loading, "
             "training, evaluation, saving); estimate: the estimator's run peak for the same setting (what the "
             "pre-flight check compares with the GPU's free memory).", "",
             "| case | model | precision | batch x tokens | s/step | tokens/s | MFU | CUDA peak GiB (phase) | "
             "estimate GiB | peak / estimate | run wall s |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| `{row['case']}` | {row['model']} | {row['precision']} | {row['batch']} x {row['block']} "
                         f"| failed: {row['error']} | | | | | | |")
            continue
        r = row["results"]
        peak = r.get("run_peak_allocated_gib")
        mfu = row["mfu_median"] if row["mfu_median"] is not None else r.get("mfu")
        lines.append(
            f"| `{row['case']}` | {row['model']} | {row['precision']} | {row['batch']} x {row['block']} | "
            f"{row['seconds_per_step']:.3f} | {row['tokens_per_s']:,.0f} | "
            + (f"{mfu:.3f}" if mfu is not None else "") + " | "
            + (f"{peak:.2f} ({r.get('run_peak_phase')})" if peak is not None else "") + f" | {row['estimate_gib']:.2f} | "
            + (f"{peak / row['estimate_gib']:.2f}" if peak is not None else "") + f" | {row['wall_s']:.0f} |")
    notes = header.get("notes") or []
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="where report.md and report.json go")
    parser.add_argument("--work_dir", default="runs/gpu", help="models, run folders (deleted at the end) and logs")
    parser.add_argument("--cases", default=",".join(c[0] for c in CASES))
    parser.add_argument("--small_shape", default="llama-3.2-1b", help="a launch/shapes/ name or a config.json")
    parser.add_argument("--large_shape", default="llama-7b")
    parser.add_argument("--small_batch", default="8x1024", help="micro-batch x tokens of the small model's cases")
    parser.add_argument("--large_batch", default="8x512", help="of the large model's (the LOMO paper's Table 1)")
    parser.add_argument("--config_file", default="single_gpu.yaml", help="an accelerate_configs/ file")
    parser.add_argument("--budget_s", type=float, default=None, help="start no case whose expected time is not left")
    args = parser.parse_args(argv)
    started = time.monotonic()

    import accelerate
    import torch
    import transformers
    from optimizer_recipes.core.run.throughput import hardware
    from optimizer_recipes.measure.make_model import write_model

    work, report_dir = Path(args.work_dir), Path(args.output_dir)
    work.mkdir(parents=True, exist_ok=True)
    report_dir.mkdir(parents=True, exist_ok=True)
    header = {"gpu": hardware(), "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "transformers": transformers.__version__, "accelerate": accelerate.__version__,
              "settings": vars(args), "models": {}, "notes": []}
    data = work / "corpus.txt"
    header["corpus_documents"] = write_corpus(data, repeats=12)
    wanted = args.cases.split(",")
    earlier = report_dir / "report.json"  # an earlier report's rows of the cases not run again are kept
    rows = [r for r in json.loads(earlier.read_text())["rows"] if r["case"] not in wanted] if earlier.exists() else []
    for name, recipe, size, flags, steps, expected in (c for c in CASES if c[0] in wanted):
        left = None if args.budget_s is None else args.budget_s - (time.monotonic() - started)
        if left is not None and left < expected:
            header["notes"].append(f"- `{name}` not run: {left:.0f} s of the budget left, {expected} s expected")
            continue
        shape = args.small_shape if size == "small" else args.large_shape
        batch, block = (int(x) for x in (args.small_batch if size == "small" else args.large_batch).split("x"))
        model = work / f"model-{size}"
        if not model.exists():
            written = write_model(shape, model)
            header["models"][size] = {k: v for k, v in written.items() if k != "output"}
            print(f"gpu_figures: wrote {shape}: {json.dumps(header['models'][size])}", flush=True)
        out = work / f"run-{name}"
        shutil.rmtree(out, ignore_errors=True)
        row = {"case": name, "recipe": recipe, "model": Path(shape).stem if shape.endswith(".json") else shape, "precision": precision_of(flags),
               "batch": batch, "block": block, "flags": flags,
               "estimate_gib": estimated_gib(recipe, model, flags, batch, block)}
        log = work / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        command = case_command(recipe, model, data, out, flags, steps, batch, block, args.config_file)
        run_started = time.monotonic()
        try:
            with log.open("w") as f:
                proc = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                      timeout=None if left is None else max(left, 1),
                                      env=dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1"))
            row["wall_s"] = time.monotonic() - run_started
            if proc.returncode != 0:
                row["error"] = f"exit {proc.returncode} (see {log.name})"
            else:
                row.update(measured(out))
        except subprocess.TimeoutExpired:
            row["error"] = "out of the budget"
        rows.append(row)
        rows.sort(key=lambda r: [c[0] for c in CASES].index(r["case"]))
        print(f"gpu_figures: {json.dumps(row)}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        write_reports(report_dir, header, rows)
    write_reports(report_dir, header, rows)
    for size in ("small", "large"):
        shutil.rmtree(work / f"model-{size}", ignore_errors=True)
    print((report_dir / "report.md").read_text())


def write_reports(report_dir: Path, header: dict, rows: list[dict]) -> None:
    (report_dir / "report.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
    (report_dir / "report.md").write_text(report(header, rows))


if __name__ == "__main__":
    main()
