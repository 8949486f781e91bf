"""Does GrokAdamW grok sooner than AdamW? A modular-arithmetic comparison that anyone can rerun on a CPU.

    python launch/grokking.py --output_dir runs/grokking            # the full comparison (32 min, 2 CPU cores)
    python launch/grokking.py --output_dir runs/grokking-quick --quick   # about a minute: checks that it all runs
    python launch/grokking.py --output_dir docs/grokking --replot        # the plot again, from results.json

Data: every pair (a, b) with 0 <= a, b < p as the prompt "a + b =" and the answer (a + b) mod p (or a*b, a-b with
--operation), one token each (a word-level tokenizer of the p numbers, the operation sign and "="); a seeded
--train_fraction of the pairs trains and the rest validates. Model: a 1-layer Llama (hidden 128, 4 heads,
intermediate 512), freshly initialised for each seed. Each run is a recipe launched as users launch it
(`python recipes/<name>.py --dataset_name <dir> ...`) with the loss on the answer token only (prompt/completion
data); train accuracy comes from the training batches (`token_accuracy` in metrics.jsonl), validation accuracy
from an evaluation every --eval_steps (`eval_token_accuracy`). A run stops once both reach --target, or at
--max_steps.

Writes DIR/report.md (steps to the target train and validation accuracy per setting: median and range over seeds),
DIR/results.json (the same, null where a run never got there, plus every run's curves) and DIR/accuracy.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from optimizer_recipes.core.run.metrics import read_results

REPO = Path(__file__).resolve().parents[2]  # the repository (recipes/measure/<this>.py)
OPERATIONS = {"+": lambda a, b, p: (a + b) % p, "-": lambda a, b, p: (a - b) % p, "*": lambda a, b, p: (a * b) % p}


@dataclass(frozen=True)
class Setting:
    recipe: str
    weight_decay: float
    signal: str = "off"  # GrokAdamW's grokking signal: off (upstream's default) or eval_train_gap

    @property
    def name(self) -> str:
        signal = {"off": "", "eval_train_gap": ", signal on"}[self.signal] if self.recipe == "grokadamw" else ""
        return f"{self.recipe} (weight decay {self.weight_decay:g}{signal})"

    def flags(self) -> list[str]:
        flags = ["--weight_decay", str(self.weight_decay)]
        if self.recipe == "grokadamw" and self.signal != "off":
            flags += ["--grokadamw_signal", self.signal]
        return flags


def settings(weight_decays: list[float]) -> list[Setting]:
    return [s for wd in weight_decays for s in (Setting("adamw", wd), Setting("grokadamw", wd),
                                                Setting("grokadamw", wd, "eval_train_gap"))]


def write_data(folder: Path, p: int, operation: str, train_fraction: float, seed: int) -> tuple[int, int]:
    """train.jsonl and validation.jsonl of prompt/completion pairs: every (a, b), split by a seeded shuffle."""
    pairs = [(a, b) for a in range(p) for b in range(p)]
    random.Random(seed).shuffle(pairs)
    cut = round(train_fraction * len(pairs))
    folder.mkdir(parents=True, exist_ok=True)
    for split, chunk in (("train", pairs[:cut]), ("validation", pairs[cut:])):
        with open(folder / f"{split}.jsonl", "w") as f:
            for a, b in chunk:
                answer = OPERATIONS[operation](a, b, p)
                f.write(json.dumps({"prompt": f"{a} {operation} {b} =", "completion": str(answer)}) + "\n")
    return cut, len(pairs) - cut


def write_model(folder: Path, p: int, operation: str, seed: int) -> None:
    """A word-level tokenizer (no BOS/EOS: the loss is on the answer token alone) and a fresh 1-layer Llama."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {str(i): i for i in range(p)} | {operation: p, "=": p + 1, "<pad>": p + 2}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<pad>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=512, max_position_embeddings=8,
                         pad_token_id=p + 2, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def run_one(setting: Setting, seed: int, args, data: Path, model: Path, out: Path) -> dict:
    """Launch the recipe; stop it (SIGTERM: it checkpoints and exits 0) once both accuracies reach the target."""
    cmd = [sys.executable, str(REPO / "recipes" / f"{setting.recipe}.py"), "--model_name_or_path", str(model),
           "--dataset_name", str(data), "--dataset_format", "prompt_completion", "--packing", "false",
           "--block_size", "8", "--per_device_train_batch_size", str(args.batch_size),
           "--per_device_eval_batch_size", "4096", "--max_steps", str(args.max_steps), "--learning_rate",
           str(args.learning_rate), "--lr_scheduler_type", "constant_with_warmup", "--warmup_steps", "10",
           "--adam_beta1", "0.9", "--adam_beta2", "0.98", "--logging_steps", str(args.logging_steps),
           "--eval_steps", str(args.eval_steps), "--save_steps", "0", "--seed", str(seed), "--report_to", "none",
           "--output_dir", str(out), "--overwrite_output_dir", "true", *setting.flags()]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    log = open(out.parent / f"{out.name}.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    stopped_early = False
    while proc.poll() is None:
        time.sleep(0.5)
        curves = read_curves(out)
        if not stopped_early and reached(curves["train"], args.target) and reached(curves["validation"], args.target):
            proc.send_signal(signal.SIGTERM)
            stopped_early = True
    log.close()
    if proc.returncode != 0:
        raise SystemExit(f"grokking: {setting.name}, seed {seed} failed (exit {proc.returncode}); see {log.name}")
    curves = read_curves(out)
    return {"setting": setting.name, "recipe": setting.recipe, "weight_decay": setting.weight_decay,
            "signal": setting.signal, "seed": seed, "seconds": round(time.perf_counter() - started, 1),
            "steps_to_train_target": reached(curves["train"], args.target),
            "steps_to_validation_target": reached(curves["validation"], args.target),
            "last_step": max([s for s, _ in curves["train"]], default=0), "curves": curves}


def read_curves(out: Path) -> dict:
    curves = {"train": [], "validation": []}
    path = out / "metrics.jsonl"
    if not path.is_file():
        return curves
    for line in path.read_text().splitlines():
        if not line.endswith("}"):
            continue  # a line being written
        record = json.loads(line)
        if "token_accuracy" in record:
            curves["train"].append((record["step"], record["token_accuracy"]))
        if "eval_token_accuracy" in record:
            curves["validation"].append((record["step"], record["eval_token_accuracy"]))
    return curves


def reached(curve: list, target: float) -> int | None:
    """The first step at which the accuracy reached the target, or None."""
    return next((step for step, accuracy in curve if accuracy >= target), None)


def summary(values: list) -> str:
    got = sorted(v for v in values if v is not None)
    if not got:
        return f"never (0/{len(values)})"
    text = f"{statistics.median(got):g}" + (f" [{got[0]}-{got[-1]}]" if len(got) > 1 else "")
    return text + (f" ({len(got)}/{len(values)} reached)" if len(got) < len(values) else "")


def write_report(runs: list[dict], args, sizes: tuple[int, int], out: Path) -> None:
    names = list(dict.fromkeys(r["setting"] for r in runs))
    rows = {n: [r for r in runs if r["setting"] == n] for n in names}
    table = {n: {"steps_to_train_target": [r["steps_to_train_target"] for r in rs],
                 "steps_to_validation_target": [r["steps_to_validation_target"] for r in rs],
                 "seeds": [r["seed"] for r in rs]} for n, rs in rows.items()}
    pct = f"{args.target:.0%}"
    lines = [f"# Grokking: a {args.operation} b mod {args.p}, {args.train_fraction:.0%} of the pairs for training",
             "", f"`python launch/grokking.py {' '.join(sys.argv[1:])}`", "",
             f"{sizes[0]} training pairs, {sizes[1]} validation pairs; batch {args.batch_size}, lr "
             f"{args.learning_rate:g} (10 warm-up steps, then constant), betas (0.9, 0.98), at most {args.max_steps} "
             f"steps; seeds {', '.join(map(str, args.seeds))}. Steps to {pct} accuracy of the answer token: median "
             f"[range] over seeds (train: logged every {args.logging_steps} steps from the training batches; "
             f"validation: evaluated every {args.eval_steps} steps).", "",
             f"| optimizer | steps to {pct} train | steps to {pct} validation |", "|---|---|---|"]
    for name, numbers in table.items():
        lines.append(f"| {name} | {summary(numbers['steps_to_train_target'])} | "
                     f"{summary(numbers['steps_to_validation_target'])} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    settings_used = {k: getattr(args, k) for k in ("p", "operation", "train_fraction", "batch_size", "learning_rate",
                                                   "max_steps", "eval_steps", "logging_steps", "target", "seeds",
                                                   "weight_decays")}
    (out / "results.json").write_text(json.dumps({"settings": settings_used, "summary": table, "runs": runs},
                                                 indent=1) + "\n")
    plot(rows, args, out / "accuracy.png")


def plot(rows: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for color, (name, runs) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4, rows.items()):
        for i, run in enumerate(runs):
            for ax, key in zip(axes, ("train", "validation")):
                steps, accuracy = zip(*run["curves"][key]) if run["curves"][key] else ((), ())
                ax.plot(steps, accuracy, color=color, alpha=0.8, linewidth=1.2, label=name if i == 0 else None)
    for ax, title in zip(axes, ("train accuracy (answer token)", "validation accuracy (answer token)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.axhline(args.target, color="grey", linewidth=0.6, linestyle=":")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"a {args.operation} b mod {args.p}, {args.train_fraction:.0%} of pairs trained; one line per seed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--quick", action="store_true",
                        help="one seed, weight decay 1.0, p 31, half the pairs, batch 64, 150 steps")
    parser.add_argument("--p", type=int, default=97)
    parser.add_argument("--operation", choices=sorted(OPERATIONS), default="+")
    parser.add_argument("--train_fraction", type=float, default=0.3)
    parser.add_argument("--weight_decays", type=float, nargs="+", default=[1.0, 0.005])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max_steps", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--logging_steps", type=int, default=10)
    parser.add_argument("--eval_steps", type=int, default=50)
    parser.add_argument("--target", type=float, default=0.99)
    parser.add_argument("--data_seed", type=int, default=0, help="the train/validation split")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs at once, one thread each")
    parser.add_argument("--replot", action="store_true",
                        help="no training: draw accuracy.png again from --output_dir's results.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.p, args.seeds, args.weight_decays, args.max_steps, args.eval_steps = 31, [0], [1.0], 150, 25
        args.train_fraction, args.batch_size = 0.5, 64
    if not 0 < args.train_fraction < 1:
        parser.error(f"--train_fraction {args.train_fraction}: give a fraction between 0 and 1")
    if args.p < 2:
        parser.error(f"--p {args.p}: give a modulus of at least 2")
    return args


def replot(out: Path, args) -> None:
    """accuracy.png from a finished comparison's results.json (its settings and every run's curves)."""
    results = read_results(out)
    for key in ("p", "operation", "train_fraction", "target"):
        setattr(args, key, results["settings"][key])
    names = list(dict.fromkeys(r["setting"] for r in results["runs"]))
    plot({n: [r for r in results["runs"] if r["setting"] == n] for n in names}, args, out / "accuracy.png")


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.output_dir)
    if args.replot:
        if not (out / "results.json").is_file():
            raise SystemExit(f"grokking: --replot: no results.json in {out}; run the comparison first")
        replot(out, args)
        print(f"wrote {out / 'accuracy.png'}")
        return
    out.mkdir(parents=True, exist_ok=True)
    sizes = write_data(out / "data", args.p, args.operation, args.train_fraction, args.data_seed)
    for seed in args.seeds:
        write_model(out / f"model-seed{seed}", args.p, args.operation, seed)
    jobs = [(s, seed) for s in settings(args.weight_decays) for seed in args.seeds]
    print(f"grokking: {len(jobs)} runs ({len(jobs) // len(args.seeds)} settings x {len(args.seeds)} seeds), "
          f"{args.jobs} at a time; logs in {out / 'runs'}", flush=True)
    (out / "runs").mkdir(exist_ok=True)

    def one(job):
        setting, seed = job
        tag = f"{setting.recipe}-wd{setting.weight_decay:g}-signal_{setting.signal}-seed{seed}"
        result = run_one(setting, seed, args, out / "data", out / f"model-seed{seed}", out / "runs" / tag)
        print(f"  {setting.name}, seed {seed}: train {result['steps_to_train_target']}, validation "
              f"{result['steps_to_validation_target']} ({result['seconds']:.0f} s)", flush=True)
        return result

    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(one, jobs))
    write_report(runs, args, sizes, out)
    print((out / "report.md").read_text(), end="")


if __name__ == "__main__":
    main()
