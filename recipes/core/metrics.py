"""Where training numbers go: a progress bar, a log line, `metrics.jsonl` in output_dir, and accelerate's trackers.

Losses stay on the device between log points; they are reduced across processes and read once per interval, so
logging costs one synchronisation per `logging_steps`, not one per step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from recipes.core.memory import PeakMemoryMeter

BAR_FIELDS = ("loss", "lr", "tokens_per_s", "peak_allocated_gib", "peak_rss_gib")


class TrainingMetrics:
    def __init__(self, accelerator: Accelerator, output_dir: Path, total_steps: int, first_step: int = 0):
        """A resumed run (first_step > 0) appends to metrics.jsonl; a fresh one starts it anew."""
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.bar = tqdm(total=total_steps, initial=first_step, disable=not self.is_main, desc="training",
                        dynamic_ncols=True)
        self.jsonl = open(output_dir / "metrics.jsonl", "a" if first_step else "w") if self.is_main else None
        self._loss_sum = torch.zeros((), device=accelerator.device)
        self._steps = 0
        self._tokens = 0
        self._started = time.perf_counter()
        self.memory = PeakMemoryMeter(accelerator.device)

    def add_step(self, loss_sum: torch.Tensor, tokens: int) -> None:
        """One optimizer step: its loss (mean over micro-batches, this process) and the tokens all processes saw."""
        self._loss_sum += loss_sum
        self._steps += 1
        self._tokens += tokens
        self.bar.update(1)

    def flush(self, step: int, **extra: float | None) -> dict:
        """Reduce the interval's numbers across processes, then print, write and track them. Call on every rank."""
        loss = self.accelerator.reduce(self._loss_sum, reduction="mean").item() / max(self._steps, 1)
        elapsed = time.perf_counter() - self._started
        record = {"step": step, "loss": loss, "tokens_per_s": self._tokens / elapsed if elapsed > 0 else 0.0}
        record.update({k: v for k, v in extra.items() if v is not None})
        record.update(self.memory.read_and_reset())  # this process's peak since the last log point
        self._loss_sum.zero_()
        self._steps, self._tokens, self._started = 0, 0, time.perf_counter()
        self.write(record)
        return record

    def write(self, record: dict) -> None:
        if not self.is_main:
            return
        self.bar.set_postfix({k: _short(v) for k, v in record.items() if k in BAR_FIELDS})
        self.bar.write(" ".join(f"{k}={_short(v)}" for k, v in record.items()))
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        self.bar.close()
        if self.jsonl:
            self.jsonl.close()


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
