"""LOMO's headline at its real scale: a model of a published shape fully fine-tuned through the whole run (load,
train, evaluate, checkpoint, final save, then resume), each phase's measured peak beside the estimate.

    python launch/scale_run.py --output_dir docs/memory/llama-7b --shape llama-7b --recipes lomo,adalomo
    python launch/scale_run.py --output_dir docs/memory/llama-7b-in-backward --shape llama-7b \
        --recipes adafactor,apollo_mini,galore,apollo --optimizer_in_backward true

For each recipe, one process, pure bf16 weights (`--dtype bfloat16`) with gradient checkpointing:
1. a fresh run of `--max_steps` steps with an evaluation after step 1, a checkpoint at its last step, the final
   evaluation and save;
2. the same command resumed from that checkpoint (`--resume_from_checkpoint latest`) for one more step, with its own
   checkpoint (`--save_total_limit 1`: the first is then deleted), evaluation and save. The fresh run's final weights
   are deleted before it (the resume reads the checkpoint), so the disk holds at most the model, two checkpoints
   and one save.
Each run's `results.json` has its peak per phase (`phase_peak_<phase>_gib`: the process's RSS on a CPU, CUDA's
max allocated on a GPU); they are tabled beside the estimator's run peak plus the process's baseline
(`recipes/core/memory/check.py`, what the pre-flight check uses), with s/step, tokens/s and achieved FLOP/s. The
model folder is written by `launch/make_model.py` (random weights: the figures are memory and speed, never quality)
and every run folder is deleted after it is read (a 7B save is 13 GB): `--keep` keeps them. Writes report.md and
report.json to --output_dir after each recipe, keeping the rows of recipes an earlier run at the same settings
measured there (so one recipe can be rerun alone), then rewrites the README's blocks from them.
"""

from __future__ import annotations

import argparse
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

PHASES = ("loading", "training", "evaluation", "saving")


def write_text_data(path: Path, documents: int) -> None:
    """A small plain-text file of the embedded corpus: 5% of it (at least one line) is held out for evaluation."""
    from optimizer_recipes.core.data.embedded import train_documents

    path.write_text("".join(doc + "\n" for doc in train_documents()[:documents]))


def recipe_command(recipe: str, model: Path, data: Path, out: Path, args, max_steps: int, resume: bool) -> list[str]:
    command = [sys.executable, str(REPO / "recipes" / f"{recipe}.py"), "--model_name_or_path", str(model),
               "--dataset_name", str(data), "--dtype", "bfloat16", "--gradient_checkpointing", "true",
               "--per_device_train_batch_size", str(args.per_device_train_batch_size),
               "--per_device_eval_batch_size", str(args.per_device_eval_batch_size),
               "--block_size", str(args.block_size), "--max_steps", str(max_steps), "--eval_steps", "1",
               "--save_steps", str(max_steps), "--save_total_limit", "1", "--logging_steps", "1",
               "--output_dir", str(out)]
    in_backward = ["--optimizer_in_backward", "true"] if args.optimizer_in_backward and not stepped_in_backward(recipe) \
        else []  # LOMO and AdaLomo update in backward already
    return command + in_backward + (["--resume_from_checkpoint", "latest"] if resume else [])


def drop_final_save(out: Path) -> None:
    """The fresh run's final weights (13 GB at 7B): the resumed run needs only its checkpoint, and a disk that holds the
    model, that checkpoint, the resumed run's checkpoint and its final save should not also hold these."""
    for weights in [*out.glob("*.safetensors"), *out.glob("*.safetensors.index.json")]:
        weights.unlink()


def recipe_named(name: str):
    from optimizer_recipes.core.optimizers.protocol import all_recipes

    return next(r for r in all_recipes() if r.name == name)


def stepped_in_backward(recipe_name: str) -> bool:
    return recipe_named(recipe_name).updates_in_backward


def run(command: list[str], log: Path) -> float:
    started = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              env=dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1"))
    if proc.returncode != 0:
        raise SystemExit(f"scale_run: {' '.join(command)} exited {proc.returncode}; its output: {log}\n"
                         + "".join(log.read_text().splitlines(keepends=True)[-15:]))
    return time.perf_counter() - started


def measured(out: Path, wall_s: float, after_step: int) -> dict:
    """The run's figures; its steps are those after `after_step` (a resumed run appends to metrics.jsonl)."""
    results, steps = read_results(out), read_metrics(out)
    timed = [r for r in steps if "seconds_per_step" in r and r["step"] > after_step]
    later = timed[1:] or timed  # the first step of a process is its warm-up
    return {"phases_gib": {p: results.get(f"phase_peak_{p}_gib") for p in PHASES},
            "run_peak_gib": results.get("run_peak_rss_gib", results.get("run_peak_allocated_gib")),
            "run_peak_phase": results.get("run_peak_phase"),
            "seconds_per_step": statistics.median(r["seconds_per_step"] for r in later) if later else None,
            "first_step_s": timed[0]["seconds_per_step"] if timed else None,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in later) if later else None,
            "achieved_flops_per_s": results.get("achieved_flops_per_s"), "mfu": results.get("mfu"),
            "mfu_against": results.get("peak_flops_source"), "peak_flops_per_s": results.get("peak_flops_per_s"),
            "eval_loss": results.get("eval_loss"), "wall_s": wall_s}


def estimated(recipe_name: str, model: Path, args) -> dict:
    import torch
    from optimizer_recipes.core.memory.check import PROCESS_BASELINE
    from optimizer_recipes.core.memory.estimate import estimate, meta_model
    from transformers import AutoConfig
    recipe = recipe_named(recipe_name)
    if args.optimizer_in_backward and not recipe.updates_in_backward:
        from optimizer_recipes.core.per_tensor.in_backward import UpdatesInBackward

        recipe = UpdatesInBackward(recipe)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    e = estimate(recipe, meta_model(None, config=AutoConfig.from_pretrained(model)), "bf16",
                 args.per_device_train_batch_size, args.block_size, True, eval_batch=args.per_device_eval_batch_size)
    gib = 2**30
    return {"training_gib": e.training / gib, "evaluation_gib": e.evaluation / gib, "total_gib": e.total / gib,
            "baseline_gib": PROCESS_BASELINE[device] / gib,
            "with_baseline_gib": (e.total + PROCESS_BASELINE[device]) / gib}


def report(rows: dict, args, shape: str, parameters: int) -> str:
    from optimizer_recipes.core.run.throughput import hardware

    lines = [f"# {shape} fully fine-tuned: every phase's peak against the estimate", "",
             f"{parameters / 1e9:.2f}B parameters (random weights), bf16 weights (updates rounded stochastically), "
             f"gradient checkpointing{', updates in backward (--optimizer_in_backward true)' if args.optimizer_in_backward else ''}, micro-batch "
             f"{args.per_device_train_batch_size} x {args.block_size} tokens, evaluation batch "
             f"{args.per_device_eval_batch_size}, one process on {hardware()}. Peaks are the process's RSS per phase "
             "(GiB); the estimate is the estimator's run peak plus the process's baseline (what the pre-flight check "
             "compares). Fresh: a "
             f"{args.max_steps}-step run; resumed: one more step from its checkpoint (loading includes reading the "
             "checkpoint). s/step: the median after each process's first step; MFU: achieved FLOP/s over "
             "this CPU's bf16 matmul rate measured at start-up (recipes/core/run/throughput.py).", "",
             "| recipe | run | loading | training | evaluation | saving | run peak | estimate (+baseline) | "
             "peak / estimate | s/step | first step s | tokens/s | achieved GFLOP/s | MFU |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        for kind in ("fresh", "resumed"):
            m, e = row[kind], row["estimate"]
            phases = " | ".join(f"{m['phases_gib'][p]:.2f}" if m["phases_gib"][p] else "" for p in PHASES)
            flops = f"{m['achieved_flops_per_s'] / 1e9:.0f}" if m.get("achieved_flops_per_s") else ""
            lines.append(f"| `{name}` | {kind} | {phases} | {m['run_peak_gib']:.2f} ({m['run_peak_phase']}) | "
                         f"{e['with_baseline_gib']:.2f} | {m['run_peak_gib'] / e['with_baseline_gib']:.2f} | "
                         f"{m['seconds_per_step']:.1f} | {m['first_step_s']:.1f} | {m['tokens_per_s']:.2f} | "
                         f"{flops} | {m['mfu']:.2f} |" if m.get("mfu") else f"{flops} | |")
    return "\n".join(lines) + "\n"


SAME_RUN = ("shape", "per_device_train_batch_size", "per_device_eval_batch_size", "block_size", "max_steps",
            "documents", "optimizer_in_backward")


def earlier_rows(path: Path, args) -> dict:
    """The rows of an earlier report in this folder made with the same settings: a recipe run alone later joins
    them (its own row replaced)."""
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    same = all(earlier["settings"].get(key) == getattr(args, key) for key in SAME_RUN)
    return {name: row for name, row in earlier["rows"].items() if same and name not in args.recipes.split(",")}


def portable(settings: dict) -> dict:
    """The settings with paths inside the repository written relative to it (a report names no machine's paths)."""
    def relative(value):
        if isinstance(value, str) and os.path.isabs(value) and Path(value).resolve().is_relative_to(REPO):
            return str(Path(value).resolve().relative_to(REPO))
        return value
    return {key: relative(value) for key, value in settings.items()}


def write_report(report_dir: Path, rows: dict, args, made: dict | None, model: Path) -> None:
    from transformers import AutoConfig

    from optimizer_recipes.core.memory.estimate import meta_model

    parameters = made["parameters"] if made else \
        sum(p.numel() for p in meta_model(None, config=AutoConfig.from_pretrained(model)).parameters())
    (report_dir / "report.json").write_text(json.dumps({"shape": args.shape, "parameters": parameters,
                                                        "settings": portable(vars(args)), "model": made, "rows": rows},
                                                       indent=2) + "\n")
    (report_dir / "report.md").write_text(report(rows, args, args.shape, parameters))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="where report.md and report.json go")
    parser.add_argument("--shape", default="llama-7b",
                        help="a launch/shapes/ name (python launch/make_model.py --list) or a config.json")
    parser.add_argument("--model_dir", default=None, help="the model folder (default: runs/scale/<shape>; written if "
                                                          "absent, deleted at the end unless --keep)")
    parser.add_argument("--work_dir", default="runs/scale", help="run folders (deleted after each is read)")
    parser.add_argument("--recipes", default="lomo,adalomo")
    parser.add_argument("--per_device_train_batch_size", type=int, default=1)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=1)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--max_steps", type=int, default=2)
    parser.add_argument("--documents", type=int, default=400, help="lines of the generated text file (5%% held out)")
    parser.add_argument("--keep", action="store_true", help="keep the model and run folders")
    parser.add_argument("--optimizer_in_backward", choices=("true", "false"), default="false",
                        help="run the recipes with --optimizer_in_backward true (one gradient at a time)")
    args = parser.parse_args(argv)
    args.optimizer_in_backward = args.optimizer_in_backward == "true"

    from optimizer_recipes.measure.make_model import write_model

    work, report_dir = Path(args.work_dir), Path(args.output_dir)
    work.mkdir(parents=True, exist_ok=True)
    report_dir.mkdir(parents=True, exist_ok=True)
    model = Path(args.model_dir or work / Path(args.shape).stem)
    made = None
    if not model.exists():
        made = write_model(args.shape, model)
        print(f"wrote {model}: {made['parameters'] / 1e9:.2f}B parameters, peak RSS {made['peak_rss_gib']:.2f} GiB "
              f"for {made['weights_gib']:.2f} GiB of weights", flush=True)
    data = work / "text.txt"
    write_text_data(data, args.documents)
    rows = earlier_rows(report_dir / "report.json", args)
    for name in args.recipes.split(","):
        out = work / f"{name}-run"
        shutil.rmtree(out, ignore_errors=True)
        row = {"estimate": estimated(name, model, args)}
        for kind, steps, resume in (("fresh", args.max_steps, False), ("resumed", args.max_steps + 1, True)):
            wall = run(recipe_command(name, model, data, out, args, steps, resume), work / f"{name}-{kind}.log")
            row[kind] = measured(out, wall, after_step=args.max_steps if resume else 0)
            print(f"{name} {kind}: {json.dumps(row[kind])}", flush=True)
            if not resume and not args.keep:
                drop_final_save(out)
        rows[name] = row
        write_report(report_dir, rows, args, made, model)  # after each recipe: a later failure loses none
        if not args.keep:
            shutil.rmtree(out)
    print((report_dir / "report.md").read_text())
    from optimizer_recipes.measure.doc_blocks import write_blocks

    write_blocks()
    if not args.keep and made:
        shutil.rmtree(model)


if __name__ == "__main__":
    main()
