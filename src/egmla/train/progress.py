"""A progress bar that counts optimizer steps towards max_steps (streams have no epoch length)."""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """Redrawn every `refresh_rate` micro-batches (train.log_every): each redraw reads the logged loss from the
    GPU, so a redraw per step would stall the host on the device once per step."""

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        return trainer.max_steps * trainer.accumulate_grad_batches if trainer.max_steps > 0 else float("inf")

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
