"""`PeriodicEval`: run an lm-eval suite on the model every N optimizer steps while it trains.

    trainer = L.Trainer(..., callbacks=[PeriodicEval(eval_cfg, every_steps=1000)])

On rank zero, every `every_steps` optimizer steps, it scores the LightningModule's `.model` (an egmla
Transformer) with `evaluate_model` and the DataModule's `.tokenizer`, logs `eval/<task>/<metric>`,
`eval/avg_acc` and `eval/avg_acc_norm` to the trainer's loggers at that step, and keeps each result in
`history`. Training resumes exactly as it would have without the evaluation: the model goes back to train
mode and the random number generators (python, numpy, torch, CUDA) are restored, since lm-eval seeds them.

It runs on the device the model trains on, with the eval group's batch_size and limit. Settings and task
names are checked when the callback is made; a task whose data is missing fails at the first evaluation.
Under DDP the other ranks wait for rank zero at their next collective: keep the suite small (eval.limit) so the
wait stays well inside the process group's timeout. A sharded model (FSDP) is refused: every rank would be needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from typing import Any

import lightning as L
import numpy as np
import torch

from ..model import ConfigError
from .run import AVERAGES, EvalSettings, check_int, check_tasks, evaluate_model, task_manager


@contextlib.contextmanager
def preserved_rng():
    """Restore python's, numpy's, torch's and CUDA's random states on exit."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def flatten(results: dict[str, Any]) -> dict[str, float]:
    """{"eval": {task: {metric: v}}, "avg_acc": a, "avg_acc_norm": b} -> {"eval/task/metric": v, "eval/avg_acc": a,
    "eval/avg_acc_norm": b}; no stderr, no None."""
    metrics = {
        f"eval/{task}/{metric}": value
        for task, scores in results["eval"].items()
        for metric, value in scores.items()
        if value is not None and "stderr" not in metric
    }
    for key in AVERAGES.values():
        if results.get(key) is not None:
            metrics[f"eval/{key}"] = results[key]
    return metrics


class PeriodicEval(L.Callback):
    """Evaluate `pl_module.model` every `every_steps` optimizer steps (default: eval_cfg's every_steps)."""

    def __init__(self, eval_cfg: dict[str, Any], every_steps: int | None = None):
        """Checks the settings and the task names now (one line, before training starts); reads no task data."""
        settings = EvalSettings.from_dict(eval_cfg)
        settings.require_tasks()
        self.every_steps = every_steps if every_steps is not None else settings.every_steps
        check_int("every_steps", self.every_steps, minimum=1)
        self.eval_cfg = dataclasses.asdict(settings) | {"device": "auto"}  # never move the training model
        self.manager = task_manager(settings)  # indexed once, reused at every evaluation
        check_tasks(self.manager, settings)
        self.history: list[dict[str, Any]] = []
        self._last_step = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        if isinstance(trainer.strategy, FSDPStrategy | ModelParallelStrategy):
            raise ConfigError("eval.every_steps does not support sharded training (FSDP): evaluate with egmla-eval")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step  # a resumed run does not re-evaluate the step it resumed at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step or step % self.every_steps:
            return  # not an optimizer step boundary (gradient accumulation), or not due
        self._last_step = step
        if trainer.is_global_zero:
            self.evaluate(trainer, pl_module, step)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> dict[str, Any]:
        tokenizer = trainer.datamodule.tokenizer
        model = pl_module.model
        was_training = model.training
        try:
            with preserved_rng(), torch.no_grad():
                results = evaluate_model(model, tokenizer, self.eval_cfg, manager=self.manager)
        finally:
            model.train(was_training)
        for logger in trainer.loggers:
            logger.log_metrics(flatten(results), step=step)
        self.history.append({"step": step, **results})
        return results
