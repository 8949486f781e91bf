"""Where training numbers go: a progress bar, a log line, `metrics.jsonl` in output_dir, and accelerate's trackers.

The bars (this one, and the data and model loading bars of datasets and transformers) show only where someone
watches: on a terminal, unless TQDM_DISABLE is set or --disable_tqdm is true (`progress_bars_wanted`). In a log file
each log point is then a line of its own.

Losses stay on the device between log points; they are reduced across processes and read once per interval, so
logging costs one synchronisation per `logging_steps`, not one per step.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from optimizer_recipes.core.memory.profile import PeakMemoryMeter
from tqdm.auto import tqdm

BAR_FIELDS = ("loss", "lr", "tokens_per_s", "mfu", "peak_allocated_gib", "peak_rss_gib")


METRICS_FILE = "metrics.jsonl"  # one record per log point, evaluation and the end (TrainingMetrics writes it)
RESULTS_FILE = "results.json"  # the run's final figures (the loop writes it at the end)


def read_metrics(output_dir) -> list[dict]:
    """A run's metrics.jsonl: its records in order (a resumed run appends to the same file)."""
    path = Path(output_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_results(output_dir) -> dict:
    """A run's results.json, or {} where the run has not finished."""
    path = Path(output_dir) / RESULTS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


class TrainingMetrics:
    def __init__(self, accelerator: Accelerator, output_dir: Path, total_steps: int, first_step: int = 0,
                 tokens_seen: tuple[int, int] = (0, 0), loss_since_evaluation: list | None = None,
                 flops_per_token: float | None = None, peak_flops: float | None = None,
                 peak_flops_source: str | None = None, memory: PeakMemoryMeter | None = None,
                 progress_bar: bool = True, remeasure_peak: Callable[[], float] | None = None):
        """A resumed run (first_step > 0) appends to metrics.jsonl; a fresh one starts it anew. `tokens_seen`: the
        (input, trained) tokens of the steps before first_step. MFU is logged where `peak_flops` (one process's
        device, FLOP/s; `peak_flops_source` says what it is) is known. `memory`: the run's meter (a new one if not
        given), read at every log point. `remeasure_peak`: measures a measured peak again, for when an MFU above 1
        shows that the first measurement was disturbed."""
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.bar = tqdm(total=total_steps, initial=first_step, disable=not (self.is_main and progress_bar),
                        desc="training", dynamic_ncols=True)
        self.jsonl = open(output_dir / METRICS_FILE, "a" if first_step else "w") if self.is_main else None
        self.total_steps = total_steps
        self._loss_sum = torch.zeros((), device=accelerator.device)
        self._predictions = torch.zeros(2, dtype=torch.long, device=accelerator.device)  # (correct, trained)
        self._loss_since_evaluation = torch.tensor(loss_since_evaluation or [0.0, 0], dtype=torch.float32,
                                                   device=accelerator.device)  # (loss sum, steps)
        self._pending_tokens = torch.zeros(2, dtype=torch.long, device=accelerator.device)  # not yet reduced
        self.tokens_seen, self.trained_tokens_seen = tokens_seen
        self._steps = 0
        self._interval_tokens = [0, 0]  # (input, trained) tokens of all processes since the last log point
        self._started = self._run_started = self.training_started = time.perf_counter()
        self._first_step = first_step
        self._flops_per_token = flops_per_token
        self._mfu_per_token_per_s = flops_per_token / (peak_flops * accelerator.num_processes) if peak_flops else None
        self.peak_flops, self.peak_flops_source = (peak_flops, peak_flops_source) if peak_flops else (None, None)
        self.mfu_values: list[float] = []
        self._remeasure_peak, self._remeasures_left = remeasure_peak, 3
        self.peak_in_doubt = False  # set once a logged MFU exceeds 1 with the peak measured again
        self.achieved_flops_values: list[float] = []  # training FLOP/s of all processes, one per log point
        self.memory = memory or PeakMemoryMeter(accelerator.device)

    def add_step(self, loss_sum: torch.Tensor, token_counts: torch.Tensor,
                 predictions: torch.Tensor | None = None) -> None:
        """One optimizer step: its loss (this process's part of the mean over the step's trained tokens, times the
        process count: the mean over processes is the step's loss), this process's (input, trained)
        token counts and (correct, trained) next-token predictions, summed over its micro-batches; all stay on the
        device until the next log point."""
        self._loss_sum += loss_sum
        self._loss_since_evaluation += torch.stack([loss_sum.detach(), torch.ones_like(loss_sum)])
        self._pending_tokens += token_counts
        if predictions is not None:
            self._predictions += predictions
        self._steps += 1
        self.bar.update(1)

    def started_training(self) -> None:
        """The first step begins: the run's clock (train_runtime_s) and the first interval start now."""
        self._started = self._run_started = self.training_started = time.perf_counter()

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evaluation, saving) is not the training's: left out of s/step, tokens/s and MFU."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._started += time.perf_counter() - started

    def sync_tokens(self) -> tuple[int, int]:
        """(input, trained) tokens of all processes so far: one reduction. Call on every rank."""
        counts = self.accelerator.reduce(self._pending_tokens.clone(), reduction="sum").tolist()
        self._pending_tokens.zero_()
        self.tokens_seen += counts[0]
        self.trained_tokens_seen += counts[1]
        self._interval_tokens = [self._interval_tokens[0] + counts[0], self._interval_tokens[1] + counts[1]]
        return self.tokens_seen, self.trained_tokens_seen

    def flush(self, step: int, **extra: float | None) -> dict:
        """Reduce the interval's numbers across processes, then print, write and track them. Call on every rank."""
        loss = self.accelerator.reduce(self._loss_sum, reduction="mean").item() / max(self._steps, 1)
        self.sync_tokens()
        elapsed = time.perf_counter() - self._started
        rate = [n / elapsed if elapsed > 0 else 0.0 for n in self._interval_tokens]
        record = {"step": step, "loss": loss, "seconds_per_step": elapsed / max(self._steps, 1),
                  "tokens_per_s": rate[0], "trained_tokens_per_s": rate[1]}
        correct, trained = self.accelerator.reduce(self._predictions.clone(), reduction="sum").tolist()
        if trained:
            record["token_accuracy"] = correct / trained  # of the training batches since the last log point
        self._predictions.zero_()
        if self._flops_per_token:
            self.achieved_flops_values.append(rate[0] * self._flops_per_token)
        if self._mfu_per_token_per_s is not None:
            if rate[0] * self._mfu_per_token_per_s > 1:  # the measured peak was too low: measure again
                self._raise_peak()
            record["mfu"] = rate[0] * self._mfu_per_token_per_s
            self.mfu_values.append(record["mfu"])
            if record["mfu"] > 1 and not self.peak_in_doubt:  # the peak, measured on a busy machine, was too low
                self.peak_in_doubt = True
                self.accelerator.print(
                    f"warning: MFU {record['mfu']:.2f} > 1: the peak it is against ({self.peak_flops_source}, "
                    f"{self.peak_flops / 1e9:.1f} GFLOP/s) was measured low, likely on a busy machine; this run's MFU "
                    "is not a utilisation (results.json: mfu_peak_in_doubt). tokens_per_s holds")
        record.update({k: v for k, v in extra.items() if v is not None})
        record.update(self.memory.read_and_reset())  # this process's peak since the last log point
        self._loss_sum.zero_()
        self._steps, self._interval_tokens, self._started = 0, [0, 0], time.perf_counter()
        done = step - self._first_step
        eta = (time.perf_counter() - self._run_started) / done * (self.total_steps - step) if done > 0 else None
        self.write(record, suffix=f" eta={_duration(eta)}" if eta is not None else "")
        return record

    def _raise_peak(self) -> None:
        """Measure the peak again (a start-up on a busy machine measures it low); keep the higher, and state the MFU
        logged so far against it."""
        while self._remeasure_peak is not None and self._remeasures_left > 0:
            self._remeasures_left -= 1
            again = self._remeasure_peak()
            if again > self.peak_flops:
                self.mfu_values = [v * self.peak_flops / again for v in self.mfu_values]
                self._mfu_per_token_per_s *= self.peak_flops / again
                self.peak_flops = again
                return

    def loss_since_evaluation(self) -> list:
        """(sum of step losses, steps) since the previous evaluation, averaged over processes, for a checkpoint: a
        resumed run starts from it. Call on every rank."""
        reduced = self.accelerator.reduce(self._loss_since_evaluation.clone(), reduction="mean")
        self._loss_since_evaluation.copy_(reduced)
        return reduced.tolist()

    def train_loss_since_evaluation(self) -> float:
        """Mean training loss of all processes since the previous call (the previous evaluation). Call on every
        rank."""
        total, steps = self.loss_since_evaluation()
        self._loss_since_evaluation.zero_()
        return total / max(steps, 1)

    def median_mfu(self) -> float | None:
        """Median over log points, the first (warm-up) left out when there are others."""
        return _median_after_warm_up(self.mfu_values)

    def throughput_summary(self) -> dict:
        """For results.json: the median MFU, the achieved training FLOP/s of all processes (median like the MFU's),
        and the one-device rate the MFU is against with what it is: mfu = achieved / (peak x processes)."""
        return {"mfu": self.median_mfu(), "achieved_flops_per_s": _median_after_warm_up(self.achieved_flops_values),
                "peak_flops_per_s": self.peak_flops, "peak_flops_source": self.peak_flops_source,
                **({"mfu_peak_in_doubt": True} if self.peak_in_doubt else {})}

    def write(self, record: dict, suffix: str = "") -> None:
        if not self.is_main:
            return
        self.bar.set_postfix({k: _short(v) for k, v in record.items() if k in BAR_FIELDS and v is not None})
        self.bar.write(" ".join(f"{k}={_short(v)}" for k, v in record.items() if v is not None) + suffix)
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        self.accelerator.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                             step=record["step"])

    def close(self) -> None:
        self.bar.close()
        if self.jsonl:
            self.jsonl.close()


def progress_bars_wanted(disable_tqdm: bool | None) -> bool:
    """--disable_tqdm if given, else bars on a terminal (stderr, where tqdm draws) unless TQDM_DISABLE is set; without
    bars, datasets' and transformers' loading bars are turned off too."""
    wanted = (not disable_tqdm) if disable_tqdm is not None else (
        sys.stderr.isatty() and os.environ.get("TQDM_DISABLE", "").lower() not in ("1", "true", "yes"))
    if not wanted:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    return wanted


def _median_after_warm_up(values: list[float]) -> float | None:
    """Median over log points, the first (warm-up) left out when there are others."""
    values = values[1:] or values
    return sorted(values)[len(values) // 2] if values else None


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
