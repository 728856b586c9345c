"""Training progress: a bar on a terminal, one line per log interval when the output goes to a file or a pipe
(a sweep's log, a batch job), where a bar's redraws would fill the file (147 KB for `make demo`)."""

from __future__ import annotations

import sys
import time

from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """Counts optimizer steps towards max_steps (streams have no epoch length). Redrawn every `refresh_rate`
    micro-batches (train.log_every): each redraw reads the logged loss and tok/s from the GPU (READ_AT_REDRAW), so a
    redraw per step would stall the host on the device once per step."""

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        return trainer.max_steps * trainer.accumulate_grad_batches if trainer.max_steps > 0 else float("inf")

    def get_metrics(self, trainer, pl_module):
        return shown_metrics(super().get_metrics(trainer, pl_module), trainer)


class StepLines(ProgressBar):
    """One line per `every` optimizer steps, and one per validation: step/max_steps, elapsed, the logged metrics."""

    def __init__(self, every: int, stream=None):
        super().__init__()
        self.every = max(1, every)
        self.stream = stream
        self._enabled = True
        self._start = time.perf_counter()
        self._last_step = -1

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, trainer, text: str) -> None:
        if self._enabled and trainer.is_global_zero:
            print(text, file=self.stream or sys.stdout, flush=True)

    def _metrics(self, trainer, pl_module) -> str:
        metrics = shown_metrics(self.get_metrics(trainer, pl_module), trainer)
        return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step != self._last_step and (step % self.every == 0 or step == trainer.max_steps):
            self._last_step = step
            elapsed = time.perf_counter() - self._start
            self._print(trainer, f"step {step}/{trainer.max_steps} {elapsed:.0f}s {self._metrics(trainer, pl_module)}")

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._print(trainer, f"validation at step {trainer.global_step}: {self._metrics(trainer, pl_module)}")


# Logged without prog_bar: Lightning reads every prog_bar metric back from the GPU after each batch, a wait for the
# device once per step (experiments/throughput/README.md); the display reads these at its redraws instead.
READ_AT_REDRAW = ("train/loss", "perf/tok_per_s")


def shown_metrics(metrics: dict, trainer) -> dict:
    """The progress-bar metrics after the training loss and tok/s, without v_num."""
    logged = trainer.callback_metrics
    shown = {name: float(logged[name]) for name in READ_AT_REDRAW if name in logged}
    return shown | {k: v for k, v in metrics.items() if k != "v_num"}


def progress_callback(every: int, stream=None) -> ProgressBar:
    """A bar on a terminal, lines elsewhere, on stdout as Lightning's bar (stderr keeps errors: one line each)."""
    target = stream or sys.stdout
    return StepProgressBar(every) if target.isatty() else StepLines(every, stream)
