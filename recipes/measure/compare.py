"""Compare finished runs side by side: loss, evaluation, throughput and peak memory, from their output folders.

    python launch/compare.py runs/adamw runs/adalomo runs/lomo
    python launch/compare.py runs/adamw-zero3 runs/lomo-zero3 --plot reports/zero3.png --markdown reports/zero3.md

Reads each folder's run_config.yaml, metrics.jsonl and results.json (what every recipe writes) and prints one
Markdown row per run. Throughput is the median of the logged tokens/s, and peak memory the largest logged peak,
both leaving out the first log point (start-up and warm-up). Peak memory is process 0's: CUDA max allocated on GPUs,
resident set (VmHWM) on CPU. `--plot` draws the training (and evaluation) loss curves (needs matplotlib:
`pip install -e ".[plot]"`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import yaml
from optimizer_recipes.core.run.metrics import read_metrics, read_results

COLUMNS = ("run", "recipe", "setup", "steps", "first loss", "last loss", "eval loss", "tokens/s", "peak GiB")


def read_run(folder: Path) -> dict:
    missing = [name for name in ("run_config.yaml", "metrics.jsonl") if not (folder / name).is_file()]
    if missing:
        raise SystemExit(f"compare: {folder} is not a run's output folder (no {', '.join(missing)}); give the "
                         "--output_dir of a recipe run")
    config = yaml.safe_load((folder / "run_config.yaml").read_text())
    records, results = read_metrics(folder), read_results(folder)
    return {"folder": folder, "config": config, "records": records, "results": results}


def summarize(run: dict) -> dict:
    logged = [r for r in run["records"] if "loss" in r]
    steady = logged[1:] or logged
    peaks = [r.get("peak_allocated_gib", r.get("peak_rss_gib")) for r in steady]
    peaks = [p for p in peaks if p is not None]
    evals = [r["eval_loss"] for r in run["records"] if "eval_loss" in r]
    config = run["config"]
    return {
        "run": run["folder"].name,
        "recipe": config.get("recipe", "?"),
        "setup": config.get("launch", "?") + (f", {n} processes" if (n := config.get("num_processes", 1)) > 1 else ""),
        "steps": logged[-1]["step"] if logged else 0,
        "first loss": logged[0]["loss"] if logged else None,
        "last loss": logged[-1]["loss"] if logged else None,
        "eval loss": run["results"].get("eval_loss", evals[-1] if evals else None),
        "tokens/s": statistics.median(r["tokens_per_s"] for r in steady) if steady else None,
        "peak GiB": max(peaks) if peaks else None,
    }


def cell(column: str, value) -> str:
    if value is None:
        return "-"
    if column == "tokens/s":
        return f"{value:,.0f}"
    if column == "peak GiB":
        return f"{value:.3f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|---|" + "---:|" * (len(COLUMNS) - 3)]
    lines += ["| " + " | ".join(cell(c, row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit('compare: --plot needs matplotlib: pip install -e ".[plot]"') from None
    figure, axis = plt.subplots(figsize=(7, 4))
    for run in runs:
        train = [(r["step"], r["loss"]) for r in run["records"] if "loss" in r]
        if not train:
            continue
        (line,) = axis.plot(*zip(*train), label=run["folder"].name)
        evals = [(r["step"], r["eval_loss"]) for r in run["records"] if "eval_loss" in r]
        if evals:
            axis.plot(*zip(*evals), "o", color=line.get_color())
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss (dots: evaluation)")
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="output folders of finished (or running) recipe runs")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table to this file")
    parser.add_argument("--plot", type=Path, default=None, help="write loss curves to this image (.png, .svg)")
    args = parser.parse_args(argv)
    runs = [read_run(folder) for folder in args.runs]
    table = markdown([summarize(run) for run in runs])
    sys.stdout.write(table)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    if args.plot:
        plot(runs, args.plot)


if __name__ == "__main__":
    main()
