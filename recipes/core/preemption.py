"""Preemption: SIGTERM, or SIGUSR1 (what SLURM sends before a time limit), asks the run to checkpoint and stop.

The signal only sets accelerate's trigger; the loop polls it once per optimizer step (an all-reduce when
distributed; free with one process), so every rank stops after the same step and they checkpoint together.
"""

from __future__ import annotations

import signal

from accelerate import Accelerator

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionRequest:
    """A context: installs the handlers on entry and puts back the ones it replaced on exit, so a programme that
    calls train() in-process (a notebook, a sweep) gets its own SIGTERM behaviour back when the run ends."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.signal_name: str | None = None
        self._replaced: dict = {}

    def __enter__(self) -> PreemptionRequest:
        self._replaced = {sig: signal.signal(sig, self._on_signal) for sig in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._replaced.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        self.accelerator.set_trigger()

    def requested(self) -> bool:
        """True on every rank once any rank got a signal (one process: no collective, no device sync)."""
        if self.accelerator.num_processes == 1:
            return self.signal_name is not None
        return self.accelerator.check_trigger()
