"""Readers of the results files the measurement commands write, beside nothing else: the fine-tuning comparison's
results.json (launch/finetune_comparison.py), a benchmark's benchmark.json (launch/benchmark.py), a 7B run's
report.json (launch/scale_run.py), a memory report's report.json (launch/memory_report.py) and the suite's timing
(launch/suite_time.py). A run's own metrics.jsonl and results.json are read beside their writer,
recipes/core/run/metrics.py."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

# --- the fine-tuning comparison: results.json ------------------------------------------------------------------


def rank_key(run: dict) -> tuple:
    """Higher is better: held-out accuracy, then eval loss (a diverged run's is infinite)."""
    return run["accuracy"], -run["eval_loss"]


def sweep_runs(runs: list[dict], recipe: str, seed: int) -> list[dict]:
    """The recipe's learning-rate sweep at `seed`, without extra flags, by learning rate."""
    return sorted((r for r in runs if r["recipe"] == recipe and r.get("seed", seed) == seed and not r.get("flags")),
                  key=lambda r: r["learning_rate"])


def best_runs(runs: list[dict], seed: int = 0) -> dict[str, dict]:
    """Per recipe, the best run of its sweep at the comparison's seed."""
    best: dict[str, dict] = {}
    for recipe in dict.fromkeys(r["recipe"] for r in runs):
        swept = sweep_runs(runs, recipe, seed)
        if swept:
            best[recipe] = max(swept, key=rank_key)
    return best


def bracketed(runs: list[dict], recipe: str, seed: int) -> bool:
    swept = sweep_runs(runs, recipe, seed)
    best = max(swept, key=rank_key)
    return best is not swept[0] and best is not swept[-1]


def seeds_of(record: dict) -> list[int]:
    """The comparison's seed, then its extra training seeds."""
    arguments = record["arguments"]
    return [arguments["seed"]] + [int(x) for x in arguments.get("extra_seeds", "").split(",") if x]


def best_at_every_seed(record: dict, recipe: str) -> list[dict]:
    """The recipe's best learning rate's run at each seed of the comparison (those that ran)."""
    runs, seed = record["runs"], record["arguments"]["seed"]
    best = best_runs(runs, seed)[recipe]
    return [r for s in seeds_of(record) for r in runs if r["recipe"] == recipe and r.get("seed", seed) == s
            and r["learning_rate"] == best["learning_rate"] and not r.get("flags")]


def read_comparison(folder: Path) -> dict:
    return json.loads((Path(folder) / "results.json").read_text())


# --- a benchmark: benchmark.json -------------------------------------------------------------------------------


def median_step(run: dict) -> float | None:
    return statistics.median(run["step_seconds"]) if run["step_seconds"] and not run["error"] else None


def round_ratios(rounds: list[dict], a: tuple[str, str], b: tuple[str, str], key=median_step) -> list[float]:
    """Each round's round[a] / round[b] (keys are (harness, optimizer)), where both ran."""
    return [key(r[a]) / key(r[b]) for r in rounds if a in r and b in r and key(r[a]) and key(r[b])]


def read_benchmark_rounds(folder: Path) -> list[dict]:
    """benchmark.json's runs, as rounds keyed by (harness, optimizer)."""
    record = json.loads((Path(folder) / "benchmark.json").read_text())
    return [{(run["harness"], run["optimizer"]): run for run in round_runs} for round_runs in record["runs"]]


# --- a 7B run (scale_run) and a memory report --------------------------------------------------------------------


def read_report(folder: Path) -> dict | None:
    """A report.json (scale_run's or memory_report's), or None where the command has not written one."""
    return read_report_file(Path(folder) / "report.json")


def read_report_file(path: Path) -> dict | None:
    """A results file a command writes whole (a report.json, the suite's timing), or None where it has not."""
    return json.loads(Path(path).read_text()) if Path(path).is_file() else None
