"""Preemption: SIGTERM, SIGUSR1 (what SLURM sends before a time limit) or SIGINT (Ctrl-C) asks the run to checkpoint
and stop.

From the start of a run until its set-up ends (flags read, data and model loaded: minutes for a large model) there
is nothing to save, so a signal stops the run at once (`PreemptedBeforeTraining`, raised from the handler; the loop
removes what the run had written and says so in one line). From then on the signal only sets accelerate's trigger;
the loop polls it once per optimizer step (an all-reduce when distributed; free with one process), so every rank
stops after the same step and they checkpoint together. After the checkpoint a SIGTERM or SIGUSR1 run exits 0 (a
scheduler requeues it), a Ctrl-C one 130 (as an interrupted command does).

Under a launcher the checkpoint must fit in its grace period: `accelerate launch` with one process sends the run
SIGTERM on Ctrl-C and kills it 5 s later (accelerate 1.16), torchrun's agent (2 or more processes) after 30 s.
"""

from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
INTERRUPTED = "SIGINT"  # Ctrl-C: the run exits 130 after its checkpoint; after the others it exits 0


class PreemptedBeforeTraining(BaseException):
    """A preemption signal arrived before the first optimizer step: nothing to save. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way (in a library loading the model) swallows it."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


class PreemptionRequest:
    """A context: installs the handlers on entry and puts back the ones it replaced on exit, so a programme that
    calls train() in-process (a notebook, a sweep) gets its own SIGTERM behaviour back when the run ends."""

    def __init__(self):
        self.accelerator = None  # set by `checkpoint_on_signal` once there is a run to save
        self.signal_name: str | None = None
        self._replaced: dict = {}

    def __enter__(self) -> PreemptionRequest:
        self._replaced = {sig: signal.signal(sig, self._on_signal) for sig in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._replaced.items():
            signal.signal(sig, handler)

    def checkpoint_on_signal(self, accelerator) -> None:
        """From now on a signal asks for a checkpoint at the end of the current step, instead of stopping at once."""
        self.accelerator = accelerator

    @property
    def training(self) -> bool:
        return self.accelerator is not None

    def _on_signal(self, signum, frame) -> None:
        self.signal_name = self.signal_name or signal.Signals(signum).name  # the first: a launcher may add SIGTERM
        if self.accelerator is None:
            raise PreemptedBeforeTraining(self.signal_name)
        self.accelerator.set_trigger()

    def requested(self) -> bool:
        """True on every rank once any rank got a signal (one process: no collective, no device sync)."""
        if self.accelerator.num_processes == 1:
            return self.signal_name is not None
        return self.accelerator.check_trigger()
