"""Where memory goes during training, measured.

- `PeakMemoryMeter`: the peak since the last log point, for every log line (cheap: two counters read and reset),
  and the whole run's peak with the phase that set it (loading, training, evaluation, saving), in results.json.
  CUDA: max_memory_allocated / max_memory_reserved. CPU: the process's peak RSS (Linux VmHWM, reset through
  /proc/self/clear_refs; elsewhere the lifetime peak from getrusage).
- `CudaMemoryHistory` (`--memory_snapshot_steps A-B`, CUDA only): records allocation history over those steps and
  dumps memory_snapshot.pickle (open it at pytorch.org/memory_viz); on a CUDA out-of-memory error it dumps
  oom_snapshot.pickle before the error is re-raised.
- `MemoryProfile` (`--profile_memory`): one training step, then the final evaluation, under torch's MemTracker, on
  any device, broken down into parameters, gradients, optimizer state, activations and temporaries; written to
  output_dir as memory_profile.json and memory_profile.md. Disabled, it is a do-nothing context.
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
from pathlib import Path

import torch
from optimizer_recipes.core.optimizers.wrappers import unwrap_optimizer

GIB = 1024**3
CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "temporaries")
# MemTracker's reference types -> the categories users read. Tensors we register ourselves (optimizer state that
# upstream keeps outside optimizer.state, e.g. AdaLomo's moments) come back as "Other".
_FROM_MEMTRACKER = {"Parameter": "parameters", "Buffer": "parameters", "Gradient": "gradients",
                    "Optstate": "optimizer_state", "Other": "optimizer_state", "Activation": "activations",
                    "Temp": "temporaries"}


class PeakMemoryMeter:
    """This process's peak memory: since the last log point (`read_and_reset`), and over the whole run with the phase
    that set it (`run_peak`). Each reading resets the counters and is credited to the phase that was running:
    loading (from the meter's creation), training, evaluation, saving."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self._phase = "loading"
        self._since_log: dict[str, float] = {}
        self._run: dict[str, float] = {}
        self._run_phase = self._phase
        self._by_phase: dict[str, float] = {}
        self._counters_read_and_reset()  # what came before the meter is not the run's

    def _counters_read_and_reset(self) -> dict[str, float]:
        if self.cuda:
            peaks = {"peak_allocated_gib": torch.cuda.max_memory_allocated(self.device) / GIB,
                     "peak_reserved_gib": torch.cuda.max_memory_reserved(self.device) / GIB}
            torch.cuda.reset_peak_memory_stats(self.device)
            return peaks
        return {"peak_rss_gib": _peak_rss_bytes_and_reset() / GIB}

    def end_phase(self, next_phase: str) -> None:
        """Credit the peak since the last reading to the phase now ending, and start `next_phase`."""
        peaks = self._counters_read_and_reset()
        for key, value in peaks.items():
            self._since_log[key] = max(self._since_log.get(key, 0.0), value)
        first = next(iter(peaks))  # peak_allocated_gib on CUDA, peak_rss_gib on a CPU: what sets the phase
        if peaks[first] > self._run.get(first, -1.0):
            self._run_phase = self._phase
        self._by_phase[self._phase] = max(self._by_phase.get(self._phase, 0.0), peaks[first])
        for key, value in peaks.items():
            self._run[key] = max(self._run.get(key, 0.0), value)
        self._phase = next_phase

    @contextlib.contextmanager
    def phase(self, name: str):
        """Everything inside is credited to `name`; afterwards the phase before it resumes."""
        resumed = self._phase
        self.end_phase(name)
        try:
            yield
        finally:
            self.end_phase(resumed)

    def read_and_reset(self) -> dict[str, float]:
        """The peak since the previous call (whatever phases ran in between)."""
        self.end_phase(self._phase)
        peaks, self._since_log = self._since_log, {}
        return peaks

    def run_peak(self) -> dict:
        """The whole run's peak so far, the phase that set it and each phase's own, e.g. {"run_peak_rss_gib": 1.9,
        "run_peak_phase": "training", "phase_peak_loading_gib": 1.2, "phase_peak_training_gib": 1.9, ...} (the
        peak allocated on CUDA, RSS on a CPU; a resumed run's loading includes reading the checkpoint)."""
        self.end_phase(self._phase)
        return ({f"run_{key}": value for key, value in self._run.items()} | {"run_peak_phase": self._run_phase}
                | {f"phase_peak_{phase}_gib": value for phase, value in self._by_phase.items()})


def peak_rss_bytes() -> int:
    """This process's peak RSS since it started or since the last reset (Linux VmHWM; elsewhere getrusage's)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _peak_rss_bytes_and_reset() -> int:
    peak = peak_rss_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass
    return peak


def tensors_outside_optimizer_state(optimizer) -> list[torch.Tensor]:
    """Optimizer-held tensors that `optimizer.state` does not list (found through the state_dict)."""
    optimizer = unwrap_optimizer(optimizer)
    known = {id(t) for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)}
    found: dict[int, torch.Tensor] = {}

    def walk(value):
        if isinstance(value, torch.Tensor):
            if id(value) not in known:
                found[id(value)] = value
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk({k: v for k, v in optimizer.state_dict().items() if k != "state"})
    return list(found.values())


def memory_tracker(model, optimizer):
    """torch's MemTracker over the model and the optimizer, with the optimizer state upstream keeps outside
    `optimizer.state` (AdaLomo's moments) tracked too, so that it counts as optimizer state."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model, unwrap_optimizer(optimizer))
    extra = tensors_outside_optimizer_state(optimizer)
    if extra:
        tracker.track_external(*extra)
    return tracker


class MemoryProfile:
    """Profiles the optimizer step numbered `step` (its last micro-batch, which carries the update) and the final
    evaluation's first batch; disabled (`step` None), it changes nothing."""

    def __init__(self, output_dir: Path, model, optimizer, step: int | None, write: bool = True):
        self.output_dir, self.model, self.optimizer, self.step, self.write = output_dir, model, optimizer, step, write
        self.result: dict | None = None

    def measure(self, step: int, completes_step: bool):
        if self.step is None or step != self.step or not completes_step or self.result is not None:
            return contextlib.nullcontext()
        return self._tracked()

    @contextlib.contextmanager
    def _tracked(self):
        tracker = memory_tracker(self.model, self.optimizer)
        with tracker:
            yield
            held = tracker.get_tracker_snapshot("current")  # what outlives the step: parameters, state, ...
        self.result = summarize(tracker, self.model, self.step, held)
        self._write()

    def measure_evaluation(self, token_loss):
        """`token_loss` with its first call (the final evaluation's first batch: every batch but the last has its
        size) measured; the evaluation's tensor peak by category goes beside the step's. Unchanged when no step was
        profiled."""
        if self.result is None or "evaluation" in self.result:
            return token_loss

        def measured(model, batch):
            if "evaluation" in self.result:
                return token_loss(model, batch)
            tracker = memory_tracker(self.model, self.optimizer)
            with tracker:
                rows = token_loss(model, batch)
            _, peak = next(iter(tracker.get_tracker_snapshot("peak").items()))
            at_peak = categorize(peak)
            self.result["evaluation"] = {"peak_bytes": peak.get("Total", sum(at_peak.values())), "at_peak": at_peak}
            self.result["run_peak_bytes"] = max(self.result["peak_bytes"], self.result["evaluation"]["peak_bytes"])
            self._write()
            return rows

        return measured

    def _write(self) -> None:
        if self.write:
            write_profile(self.output_dir, self.result)


def summarize(tracker, model, step: int, held: dict) -> dict:
    """The breakdown users read, the peak-time split, and each category's maximum over the step.

    breakdown: parameters, gradients, activations and temporaries at their largest during the step (sampled at
    module boundaries and at the peak); optimizer state as held after the step. MemTracker files every tensor made
    inside optimizer.step() as optimizer state, so its maximum would include the step's transient buffers; those
    still count in the peak.
    """
    device, peak = next(iter(tracker.get_tracker_snapshot("peak").items()))
    at_peak = categorize(peak)
    largest = dict.fromkeys(CATEGORIES, 0)
    for stats in tracker.memory_tracking.values():
        for snapshots in stats.snapshots.values():
            for snapshot in snapshots:
                for cat, value in categorize(snapshot.get(device, {})).items():
                    largest[cat] = max(largest[cat], value)
    for cat, value in at_peak.items():
        largest[cat] = max(largest[cat], value)
    root = tracker.memory_tracking.get(model)
    by_state = {getattr(k, "value", k): v for k, v in root.snapshots.items()} if root else {}
    after_forward = categorize(by_state["Post-Forward"][-1].get(device, {})) if "Post-Forward" in by_state else {}
    breakdown = dict(largest, optimizer_state=categorize(held.get(device, {}))["optimizer_state"])
    return {"step": step, "device": str(device), "peak_bytes": peak.get("Total", sum(at_peak.values())),
            "breakdown": breakdown, "at_peak": at_peak, "largest": largest,
            "activations_after_forward": after_forward.get("activations", 0)}


def categorize(snapshot: dict) -> dict[str, int]:
    out = dict.fromkeys(CATEGORIES, 0)
    for key, value in snapshot.items():
        key = getattr(key, "value", key)
        if key in _FROM_MEMTRACKER:
            out[_FROM_MEMTRACKER[key]] += value
    return out


def write_profile(output_dir: Path, result: dict) -> None:
    (output_dir / "memory_profile.json").write_text(json.dumps(result, indent=2) + "\n")
    evaluation = result.get("evaluation")
    lines = [f"# Memory of training step {result['step']} on {result['device']}", "",
             "| category | at the step's peak (MiB) | largest during the step (MiB) |"
             + (" at the evaluation's peak (MiB) |" if evaluation else ""),
             "|---|---:|---:|" + ("---:|" if evaluation else "")]
    for cat in CATEGORIES:
        lines.append(f"| {cat} | {result['at_peak'][cat] / 2**20:.2f} | {result['breakdown'][cat] / 2**20:.2f} |"
                     + (f" {evaluation['at_peak'][cat] / 2**20:.2f} |" if evaluation else ""))
    lines.append(f"| **total at peak** | **{result['peak_bytes'] / 2**20:.2f}** | |"
                 + (f" **{evaluation['peak_bytes'] / 2**20:.2f}** |" if evaluation else ""))
    lines += ["", "Optimizer state in the second column is what the optimizer holds after the step; buffers it makes "
              "and frees inside step() count in the first column."]
    (output_dir / "memory_profile.md").write_text("\n".join(lines) + "\n")


class CudaMemoryHistory:
    """Allocation history over steps [first, last]; without CUDA or a window it does nothing."""

    def __init__(self, output_dir: Path, steps: tuple[int, int] | None, device: torch.device):
        self.output_dir = output_dir
        self.steps = steps if device.type == "cuda" else None
        self.enabled = device.type == "cuda"

    def before_step(self, step: int) -> None:
        if self.steps and step == self.steps[0]:
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)

    def after_step(self, step: int) -> None:
        if self.steps and step == self.steps[1]:
            torch.cuda.memory._dump_snapshot(str(self.output_dir / "memory_snapshot.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)

    @contextlib.contextmanager
    def dump_on_out_of_memory(self):
        try:
            yield
        except torch.OutOfMemoryError:
            if self.enabled:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                torch.cuda.memory._dump_snapshot(str(self.output_dir / "oom_snapshot.pickle"))
                print(f"CUDA out of memory: wrote {self.output_dir / 'oom_snapshot.pickle'} (open it at "
                      "https://pytorch.org/memory_viz); try --gradient_checkpointing true, a smaller batch, or the "
                      "lomo/adalomo recipes", file=sys.stderr)
            raise
