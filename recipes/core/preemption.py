"""Preemption: SIGTERM, or SIGUSR1 (what SLURM sends before a time limit), asks the run to checkpoint and stop.

The signal only sets accelerate's trigger; the loop polls it once per optimizer step (an all-reduce when
distributed; free with one process), so every rank stops after the same step and they checkpoint together.
"""

from __future__ import annotations

import signal

from accelerate import Accelerator

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionRequest:
    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.signal_name: str | None = None
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        self.accelerator.set_trigger()

    def requested(self) -> bool:
        """True on every rank once any rank got a signal (one process: no collective, no device sync)."""
        if self.accelerator.num_processes == 1:
            return self.signal_name is not None
        return self.accelerator.check_trigger()
