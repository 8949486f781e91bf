"""Speed and memory of each optimizer in three harnesses: a bare PyTorch loop, the recipe, the Transformers Trainer.

    python launch/benchmark.py --output_dir reports/benchmark
    python launch/benchmark.py --output_dir reports/benchmark-32-layers --sizes num_hidden_layers=32 \\
        --optimizers lomo,schedule_free_sgd,adalomo,adafactor --harnesses bare,recipe

Same model, batch and data in every harness:
- bare: a plain PyTorch loop, no accelerate: the recipe's optimizer (`recipe.build`, the same construction and
  hyper-parameters) and loss (`recipes/core/run/token_loss.py`), then forward, `loss.backward()`, clipping if the recipe
  clips, `step()`, `zero_grad()` (LOMO and AdaLomo: `fused_backward(loss, lr)`), and the recipe's LR schedule;
- recipe: `recipes/<name>.py` itself (its `main`, as `python recipes/<name>.py` runs it: one process);
- trainer: `transformers.Trainer` with the matching `optim` name and the recipe's hyper-parameters (where it cannot
  run one, the table says why); its own loss, from the whole logits.

Each (harness, optimizer) runs in its own process (`--run`), so its peak memory is its own; rounds interleave the
harnesses (their order rotates each round). A run times every optimizer step (from the end of one to the end of the
next) and drops the first `--warmup`; step 2 is also measured under torch's MemTracker (the tensors' peak, by
category), so warm-up must cover it. Peak memory is the process's peak RSS over the steps after the first (CPU) or
`max_memory_allocated` (CUDA); the run peak is the same over the whole process (loading, every step, and for the
recipe its final evaluation and save). Ratios are medians over rounds of each round's ratio of median step times. Writes
`benchmark.md` (the table) and `benchmark.json` (every step time) to --output_dir.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository (recipes/measure/<this>.py)

from optimizer_recipes.core.optimizers.protocol import all_recipes, reference_recipe
from optimizer_recipes.core.run.metrics import read_results
from optimizer_recipes.measure.results import median_step, round_ratios

RECIPES = {r.name: r for r in all_recipes()}

HARNESSES = ("bare", "recipe", "trainer")
COMPILED = "+compile"  # a harness name with this suffix compiles: the recipe's --torch_compile true, the Trainer's
# torch_compile=True (the whole model, through accelerate), the bare loop's decoder blocks as the recipe compiles them
IN_BACKWARD = "+in_backward"  # recipe+in_backward: the recipe with --optimizer_in_backward true


def harness_kind(harness: str) -> str:
    """bare, recipe or trainer, whatever the suffixes."""
    return harness.removesuffix(IN_BACKWARD).removesuffix(COMPILED)
PROFILED_STEP = 2  # the step the recipe's --profile_memory measures; the other harnesses measure the same one
TARGETS = {"recipe/bare time": 1.03, "recipe/bare peak": 1.05, "recipe/trainer time": 1.00}


# --- one run, in its own process -------------------------------------------------------------------------------

class StepClock:
    """`tick()` at the end of every optimizer step: step times, and the peak memory after the first step."""

    def __init__(self, device):
        from optimizer_recipes.core.memory.profile import PeakMemoryMeter

        self.meter, self.ticks, self.peak = PeakMemoryMeter(device), [], None

    def tick(self) -> None:
        self.ticks.append(time.perf_counter())
        reading = self.meter.read_and_reset()
        if len(self.ticks) > 1:
            self.peak = max(self.peak or 0, reading.get("peak_allocated_gib", reading.get("peak_rss_gib")) * 2**30)

    def run_peak(self) -> float:
        """The process's peak over everything so far (loading and the first step included)."""
        reading = self.meter.run_peak()
        return reading.get("run_peak_allocated_gib", reading.get("run_peak_rss_gib")) * 2**30

    def step_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.ticks, self.ticks[1:])]  # steps 2, 3, ...


def recipe_and_config(name: str, args, output_dir: str):
    from optimizer_recipes.core.run.config import parse_config

    recipe = RECIPES[name]
    return recipe, recipe_argv(args, output_dir), parse_config(recipe, recipe_argv(args, output_dir))


def recipe_argv(args, output_dir: str) -> list[str]:
    argv = ["--model_name_or_path", args.model, "--output_dir", output_dir, "--max_steps", str(args.total_steps),
            "--per_device_train_batch_size", str(args.per_device_train_batch_size), "--block_size",
            str(args.block_size), "--logging_steps", "10", "--save_steps", "0", "--report_to", "none"]
    return argv + (["--bf16", "true"] if args.bf16 else []) + (["--torch_compile", "true"] if args.compile else []) \
        + (["--optimizer_in_backward", "true"] if args.in_backward else [])


def token_blocks(model_dir: str, block_size: int):
    """The embedded training corpus, tokenized and cut into blocks (as the recipes pack plain text)."""
    import torch
    from optimizer_recipes.core.data.embedded import train_documents
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = [i for doc in train_documents() for i in tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]]
    usable = len(ids) // block_size * block_size
    return torch.tensor(ids[:usable]).view(-1, block_size)


def start_tracker(model, optimizer):
    """MemTracker over one step, entered here, categorizing as `--profile_memory` does."""
    from optimizer_recipes.core.memory.profile import memory_tracker

    tracker = memory_tracker(model, optimizer)
    tracker.__enter__()
    return tracker


def tensor_peak(tracker) -> dict:
    from optimizer_recipes.core.memory.profile import categorize

    device, peak = next(iter(tracker.get_tracker_snapshot("peak").items()))
    return {"total": peak.get("Total", 0), **categorize(peak)}


def run_bare(name: str, args, clock: StepClock, output_dir: str) -> dict:
    import torch
    from optimizer_recipes.core.run.token_loss import build_token_loss
    from transformers import AutoModelForCausalLM, get_scheduler

    recipe, _, config = recipe_and_config(name, args, output_dir)
    t = config.train
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(t.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device).train()
    token_loss, _ = build_token_loss(model, t.chunked_loss)  # the recipes' loss: the loop is what is compared
    if args.compile:
        from optimizer_recipes.core.run.torch_compile import compile_decoder_blocks

        compile_decoder_blocks(model, None)
    optimizer = recipe.build(model, config)
    fused = hasattr(optimizer, "fused_backward")
    scheduler = get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=recipe.scheduler_warmup_steps(config),
                              num_training_steps=args.total_steps)
    if hasattr(optimizer, "train"):
        optimizer.train()  # schedule-free: parameters at y
    loader = torch.utils.data.DataLoader(token_blocks(args.model, args.block_size),
                                         batch_size=args.per_device_train_batch_size, shuffle=True, drop_last=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    profile = {}
    step = 0
    while step < args.total_steps:
        for batch in loader:
            step += 1
            tracker = start_tracker(model, optimizer) if step == PROFILED_STEP else None
            batch = batch.to(device)
            with autocast:
                rows = token_loss(model, {"input_ids": batch, "labels": batch})
                loss = rows.loss_sums.sum() / rows.trained.sum()
            if fused:
                optimizer.fused_backward(loss, scheduler.get_last_lr()[0])
            else:
                loss.backward()
                if t.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if tracker:
                tracker.__exit__(None, None, None)
                profile = tensor_peak(tracker)
            clock.tick()
            if step == args.total_steps:
                break
    return profile


def run_recipe(name: str, args, clock: StepClock, output_dir: str) -> dict:
    from optimizer_recipes.core.run.loop import main

    recipe, argv, _ = recipe_and_config(name, args, output_dir)
    recipe_for_run = recipe.for_run

    def timed_for_run(config):
        """The recipe as the run uses it (e.g. updating in backward), its step timed once per optimizer step (one
        micro-batch each here)."""
        used = recipe_for_run(config)
        if not getattr(used.step, "timed", False):
            untimed_step = used.step

            def timed_step(*step_args, **step_kwargs):
                grad_norm = untimed_step(*step_args, **step_kwargs)
                clock.tick()
                return grad_norm

            timed_step.timed = True
            used.step = timed_step
        return used

    recipe.for_run = timed_for_run
    main(recipe, argv + ["--profile_memory", "true"])  # MemTracker on step 2 (PROFILED_STEP)
    measured = json.loads((Path(output_dir) / "memory_profile.json").read_text())
    run = read_results(output_dir)  # its peak over training, evaluation, saving
    clock.recipe_run_peak = run.get("run_peak_allocated_gib", run.get("run_peak_rss_gib")) * 2**30
    return {"total": measured["peak_bytes"], **measured["at_peak"]}


def run_trainer(name: str, args, clock: StepClock, output_dir: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    recipe, _, config = recipe_and_config(name, args, output_dir)
    t = config.train
    profile, tracker = {}, []

    class Clock(TrainerCallback):
        def on_step_begin(self, arguments, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step + 1 == PROFILED_STEP:
                tracker.append(start_tracker(model, optimizer))

        def on_step_end(self, arguments, state, control, **kwargs):
            if state.global_step == PROFILED_STEP:
                tracker[0].__exit__(None, None, None)
                profile.update(tensor_peak(tracker[0]))
            clock.tick()

    torch.manual_seed(t.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.config.use_cache = False
    blocks = token_blocks(args.model, args.block_size)
    training_args = TrainingArguments(
        output_dir=output_dir, optim=recipe.trainer_optim, learning_rate=t.learning_rate, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_steps,
        per_device_train_batch_size=args.per_device_train_batch_size, max_steps=args.total_steps, logging_steps=10,
        save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0, bf16=args.bf16,
        seed=t.seed, use_cpu=not torch.cuda.is_available(), torch_compile=args.compile,
        **recipe.trainer_arguments())
    Trainer(model=model, args=training_args, train_dataset=[{"input_ids": b, "labels": b} for b in blocks],
            callbacks=[Clock()]).train()
    return profile


def run_one(args) -> None:
    """`--run HARNESS OPTIMIZER`: one measurement, written as JSON to --result."""
    import torch

    harness, name = args.run
    args.compile = harness.removesuffix(IN_BACKWARD).endswith(COMPILED)
    args.in_backward = harness.endswith(IN_BACKWARD)
    clock = StepClock(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.perf_counter()
    result = {"harness": harness, "optimizer": name, "tokens_per_step": args.per_device_train_batch_size *
              args.block_size, "error": None}
    with tempfile.TemporaryDirectory() as output_dir:
        try:
            result["tensor_peak"] = {"bare": run_bare, "recipe": run_recipe, "trainer": run_trainer}[
                harness_kind(harness)](name, args, clock, output_dir)
        except Exception as error:  # the Trainer cannot run every optimizer everywhere: say why in the table
            if not harness.startswith("trainer"):
                raise
            result["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]
    result.update(step_seconds=clock.step_seconds()[args.warmup:], peak_bytes=clock.peak,
                  wall_seconds=time.perf_counter() - started, steps=args.total_steps,
                  # both meters read (and reset) the same counter: the peak is in one of their readings
                  run_peak_bytes=max(getattr(clock, "recipe_run_peak", 0), clock.run_peak()),
                  peak_kind="max_memory_allocated" if torch.cuda.is_available() else "peak RSS")
    Path(args.result).write_text(json.dumps(result))


# --- the comparison ------------------------------------------------------------------------------------------------

def measure(args, harness: str, name: str, folder: Path) -> dict:
    result = folder / f"{harness}-{name}.json"
    cmd = [sys.executable, "-m", "optimizer_recipes.measure.benchmark", "--run", harness, name, "--result", str(result),
           "--model", args.model, "--per_device_train_batch_size", str(args.per_device_train_batch_size),
           "--block_size", str(args.block_size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--bf16", "true"] if args.bf16 else []
    env = dict(os.environ, TQDM_DISABLE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark: {harness} {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def ratio(rounds: list[dict], a: tuple[str, str], b: tuple[str, str], key=median_step) -> float | None:
    """Median over rounds of round[a] / round[b]."""
    values = round_ratios(rounds, a, b, key)
    return statistics.median(values) if values else None


def against_reference(rounds: list[dict], optimizers: list[str], harnesses: list[str], reference: str) -> list[str]:
    """Per harness, each optimizer's step time over the reference recipe's (AdamW's) in the same round: the median,
    and each round's."""
    notes = []
    for h in harnesses if reference in optimizers and len(optimizers) > 1 else ():
        cells = []
        for n in (n for n in optimizers if n != reference):
            values = round_ratios(rounds, (h, n), (h, reference))
            if values:
                cells.append(f"`{n}` {statistics.median(values):.2f} ({', '.join(f'{v:.2f}' for v in values)})")
        if cells:
            notes.append(f"- {h} step time vs `{reference}` (median of the rounds' ratios; each round's): "
                         + ", ".join(cells))
    return notes


def compile_cost(run: dict) -> float | None:
    """A run's wall time (load, every step, evaluation, save) beyond its steps at their steady pace."""
    return run["wall_seconds"] - run["steps"] * median_step(run) if median_step(run) else None


def compile_notes(rounds: list[dict], optimizers: list[str], harnesses: list[str]) -> list[str]:
    """Per harness measured eager and compiled: the compiled/eager step time, what compiling added to the run (its
    wall time beyond its steps, less the eager run's), and the steps after which compiling has paid for itself."""
    notes = []
    for h in (h for h in harnesses if h + COMPILED in harnesses):
        for n in optimizers:
            speed = ratio(rounds, (h + COMPILED, n), (h, n))
            added = [compile_cost(r[(h + COMPILED, n)]) - compile_cost(r[(h, n)]) for r in rounds
                     if (h, n) in r and (h + COMPILED, n) in r and median_step(r[(h, n)])
                     and median_step(r[(h + COMPILED, n)])]
            if speed is None or not added:
                continue
            eager = statistics.median(s for r in rounds if (h, n) in r for s in r[(h, n)]["step_seconds"])
            saved = eager * (1 - speed)
            pays = f"pays after ~{statistics.median(added) / saved:,.0f} steps" if saved > 0 else "never pays"
            notes.append(f"- `{n}` {h}: compiled/eager step time {speed:.2f}; compiling added "
                         f"{statistics.median(added):.0f} s to the run; {pays}")
    return notes


def in_backward_notes(rounds: list[dict], optimizers: list[str], harnesses: list[str]) -> list[str]:
    """Per recipe measured both ways: its step time updating in backward over its ordinary step's (each at its
    defaults: the ordinary step clips by global norm, in backward nothing clips), and the profiled step's tensor
    peak likewise."""
    notes = []
    for h in (h for h in harnesses if h + IN_BACKWARD in harnesses):
        for n in optimizers:
            values = round_ratios(rounds, (h + IN_BACKWARD, n), (h, n))
            peak = ratio(rounds, (h + IN_BACKWARD, n), (h, n), key=lambda run: run.get("tensor_peak", {}).get("total"))
            if values:
                notes.append(f"- `{n}` in backward / ordinary: step time {statistics.median(values):.2f} ("
                             f"{', '.join(f'{v:.2f}' for v in values)})"
                             + (f", tensor peak {peak:.2f}" if peak else ""))
    return notes


def summarize(rounds: list[dict], optimizers: list[str], harnesses: list[str], setup: str) -> tuple[str, dict]:
    def runs(h, n):
        return [r[(h, n)] for r in rounds if (h, n) in r]

    def ms(h, n):
        steps = [s for run in runs(h, n) if not run["error"] for s in run["step_seconds"]]
        return statistics.median(steps) * 1e3 if steps else None

    def mib(h, n, key):
        values = [key(run) for run in runs(h, n) if not run["error"] and key(run)]
        return statistics.median(values) / 2**20 if values else None

    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    def rss(run):
        return run["peak_bytes"]

    def tensors(run):
        return run.get("tensor_peak", {}).get("total")

    def whole_run(run):
        return run.get("run_peak_bytes")

    summary, lines = {}, []
    header = ["optimizer"] + [f"{h} ms/step" for h in harnesses]
    header += ["recipe/bare time", "recipe/trainer time", "recipe tokens/s"]
    header += [f"{h} peak MiB" for h in harnesses] + ["recipe/bare peak"]
    header += [f"{h} tensor peak MiB" for h in harnesses] + [f"{h} run peak MiB" for h in harnesses]
    lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    notes = []
    for n in optimizers:
        row = {f"{h}_ms": ms(h, n) for h in harnesses}
        row["recipe/bare time"] = ratio(rounds, ("recipe", n), ("bare", n))
        row["recipe/trainer time"] = ratio(rounds, ("recipe", n), ("trainer", n))
        row["recipe/bare peak"] = ratio(rounds, ("recipe", n), ("bare", n), key=rss)
        row.update({f"{h}_peak_mib": mib(h, n, rss) for h in harnesses})
        row.update({f"{h}_tensor_peak_mib": mib(h, n, tensors) for h in harnesses})
        row.update({f"{h}_run_peak_mib": mib(h, n, whole_run) for h in harnesses})
        tokens = runs("recipe", n)[0]["tokens_per_step"] if runs("recipe", n) else None
        row["recipe_tokens_per_s"] = tokens / (row["recipe_ms"] / 1e3) if tokens and row.get("recipe_ms") else None
        errors = {run["error"] for run in runs("trainer", n) if run["error"]}
        if errors:
            notes.append(f"- `{n}`: the Trainer (optim=\"{RECIPES[n].trainer_optim}\") cannot run it here: {errors.pop()}")
        summary[n] = row
        cells = [f"`{n}`"] + [cell(row[f"{h}_ms"], ".1f") for h in harnesses]
        cells += [cell(row["recipe/bare time"], ".2f"), cell(row["recipe/trainer time"], ".2f"),
                  cell(row["recipe_tokens_per_s"], ",.0f")]
        cells += [cell(row[f"{h}_peak_mib"], ".0f") for h in harnesses] + [cell(row["recipe/bare peak"], ".3f")]
        cells += [cell(row[f"{h}_tensor_peak_mib"], ".2f") for h in harnesses]
        cells += [cell(row[f"{h}_run_peak_mib"], ".0f") for h in harnesses]
        lines.append("| " + " | ".join(cells) + " |")
    pairs = {}
    for a, b in ((r.name, r.compared_with) for r in all_recipes() if r.compared_with):
        for h in harnesses:
            value = ratio(rounds, (h, a), (h, b))
            if value is not None:
                pairs[f"{h}: {a}/{b}"] = value
    if pairs:
        notes.append("- step time ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in pairs.items()))
    notes += against_reference(rounds, optimizers, harnesses, reference_recipe())
    compiled = compile_notes(rounds, optimizers, harnesses)
    notes += compiled
    in_backward = in_backward_notes(rounds, optimizers, harnesses)
    notes += in_backward
    targets = []
    for n, row in summary.items():
        for key, limit in TARGETS.items():
            if row.get(key) is not None:
                targets.append((n, key, row[key], limit, row[key] <= limit))
    missed = [f"`{n}` {key} {value:.3f} > {limit}" for n, key, value, limit, met in targets if not met]
    notes.append(f"- targets (recipe/bare <= 1.03 time, <= 1.05 peak; recipe/trainer <= 1.00 time): "
                 f"{len(targets) - len(missed)} of {len(targets)} met" + (f"; missed: {', '.join(missed)}"
                                                                            if missed else ""))
    text = setup + "\n\n" + "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"
    return text, {"setup": setup, "optimizers": summary, "pairs": pairs, "compile": compiled, "in_backward": in_backward,
                  "targets": [dict(zip(("optimizer", "ratio", "value", "limit", "met"), t)) for t in targets]}


def main(argv=None) -> None:
    from transformers.hf_argparser import string_to_bool  # --bf16, --bf16 true, --bf16 false, as the recipes take

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=None)
    parser.add_argument("--model_name_or_path", default=None, help="a local model folder; default the embedded model")
    parser.add_argument("--sizes", default="", help="the embedded model at other sizes, e.g. num_hidden_layers=32")
    parser.add_argument("--optimizers", default=",".join(RECIPES),
                        help=f"of {', '.join(RECIPES)}; default all")
    parser.add_argument("--harnesses", default=",".join(HARNESSES),
                        help=f"of {', '.join(HARNESSES)}, each also as <harness>{COMPILED}: compiled, and "
                             f"recipe{IN_BACKWARD}: the recipe updating in backward")
    parser.add_argument("--per_device_train_batch_size", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run, after the warm-up")
    parser.add_argument("--warmup", type=int, default=3, help="steps not timed (must cover step 2, the profiled one)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bf16", type=string_to_bool, nargs="?", const=True, default=False,
                        help="bf16 autocast in every harness (--bf16 true, as the recipes spell it)")
    parser.add_argument("--run", nargs=2, metavar=("HARNESS", "OPTIMIZER"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    optimizers, harnesses = args.optimizers.split(","), args.harnesses.split(",")
    unknown = [n for n in optimizers if n not in RECIPES]
    unknown += [h for h in harnesses if harness_kind(h) not in HARNESSES
                or (h.endswith(IN_BACKWARD) and harness_kind(h) != "recipe")]
    if unknown:
        parser.error(f"unknown optimizer or harness: {', '.join(unknown)}; optimizers: {', '.join(RECIPES)}; "
                     f"harnesses: {', '.join(HARNESSES)}, each also with {COMPILED} (compiled), and "
                     f"recipe{IN_BACKWARD} (--optimizer_in_backward true)")
    if args.warmup < PROFILED_STEP - 1:
        parser.error(f"--warmup {args.warmup} would time step {PROFILED_STEP}, which runs under MemTracker; use 1+")
    args.total_steps = 1 + args.warmup + args.steps  # step times start at step 2
    if args.run:
        return run_one(args)
    if not args.output_dir:
        parser.error("--output_dir is required")

    from optimizer_recipes.core.data.embedded import write_scaled_model
    from optimizer_recipes.core.memory.estimate import meta_model
    from optimizer_recipes.core.run.throughput import hardware

    folder = Path(args.output_dir)
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    if args.model_name_or_path:
        args.model = args.model_name_or_path
    else:  # a saved copy of the embedded architecture (seeded), so that every harness loads the same weights
        overrides = dict(item.split("=") for item in args.sizes.split(",") if item)
        args.model = str(write_scaled_model(folder / "model", **overrides))
    params = sum(p.numel() for p in meta_model(args.model).parameters())
    tensors = len(list(meta_model(args.model).parameters()))
    setup = (f"{args.model_name_or_path or 'the embedded Llama' + (f' ({args.sizes})' if args.sizes else '')}: "
             f"{params / 1e6:.2f}M parameters in {tensors} tensors, micro-batch {args.per_device_train_batch_size} x "
             f"{args.block_size} tokens, {'bf16 autocast' if args.bf16 else 'fp32'}, one process; "
             f"{hardware()}; "
             f"{args.rounds} rounds of {args.steps} timed steps after {args.warmup + 1} warm-up steps; "
             f"`python launch/benchmark.py {' '.join(argv if argv is not None else sys.argv[1:])}`")
    rounds = []
    for r in range(args.rounds):
        order = harnesses[r % len(harnesses):] + harnesses[:r % len(harnesses)]
        rounds.append({})
        for name in optimizers:
            for harness in order:
                run = measure(args, harness, name, folder / "runs")
                rounds[-1][(harness, name)] = run
                shown = f"{median_step(run) * 1e3:.1f} ms/step" if median_step(run) else run["error"]
                print(f"round {r + 1}/{args.rounds} {harness:15} {name:20} {shown}", flush=True)
    text, summary = summarize(rounds, optimizers, harnesses, setup)
    (folder / "benchmark.md").write_text(text)
    (folder / "benchmark.json").write_text(json.dumps(
        {**summary, "runs": [[run for run in r.values()] for r in rounds]}, indent=1) + "\n")
    print(text)
    print(f"wrote {folder / 'benchmark.md'} and {folder / 'benchmark.json'}")


if __name__ == "__main__":
    main()
