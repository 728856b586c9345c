"""The LightningModule: next-token training of any attention variant, validation loss and bits per byte."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from ..model import ModelConfig, Transformer
from . import fsdp
from .schedule import lr_multiplier
from .settings import OptimConfig


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf, or the weights blew up; checkpoints already written are left as they
    were, and none was written of weights past that point. The entry point adds which one to resume from."""


class LanguageModel(L.LightningModule):
    """Wraps the pure-PyTorch Transformer; optimizer settings come from the `optim` config group (an OptimConfig,
    or its mapping, checked here).

    token_bytes [vocab]: UTF-8 bytes each token id stands for, to report validation bits per byte.
    fused_loss: the loss comes from the model, fused with its output head (train.fused_loss).
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        optim: OptimConfig | Mapping[str, Any],
        max_steps: int,
        token_bytes: torch.Tensor,
        compile: str | None = None,
        activation_checkpointing: str = "none",
        sharding: dict | None = None,
        fused_loss: bool = True,
    ):
        super().__init__()
        self.model_cfg = model_cfg
        self.optim = optim if isinstance(optim, OptimConfig) else OptimConfig.from_dict(optim)
        self.max_steps = max_steps
        self.compile = compile  # None, "model" or "blocks" (see egmla.train.fsdp.compile_model)
        self.activation_checkpointing = activation_checkpointing
        self.fused_loss = fused_loss
        # FSDP2: precision, reshard_after_forward (fsdp.prepare_model's, used when the strategy gives a device mesh)
        self.sharding = sharding or {}
        self._configured = False
        self.model = Transformer(model_cfg)
        self.register_buffer("token_bytes", token_bytes.to(torch.float64), persistent=False)
        self._val_sums = torch.zeros(4, dtype=torch.float64)  # see validation_step
        self._cross_entropy = cross_entropy
        self.last_val: dict[str, float] | None = None  # the latest validation's loss and bpb
        self.last_val_step = -1
        self._last_ids: torch.Tensor | None = None  # the last training batch (checked against before a save)
        self._first_bad: torch.Tensor | None = None  # [step, loss] of the first non-finite loss ([-1, 0]: none)
        self._weights_checked_step = -1  # the step whose weights last passed the save-time check

    def configure_model(self) -> None:
        """Activation checkpointing, compilation and (under trainer=fsdp) FSDP2 sharding, applied once, in place:
        parameter names (and checkpoints) stay those of the plain model."""
        if self._configured:  # Lightning calls this hook again for trainer.validate() after fit()
            return
        self._configured = True
        mesh = self.device_mesh["data_parallel"] if self.device_mesh is not None else None
        fsdp.prepare_model(self.model, self.activation_checkpointing, self.compile, mesh, **self.sharding)
        if self.compile and not self.fused_loss:
            # Compiling the loss fuses the fp32 upcast into the softmax instead of materialising fp32 logits:
            # faster and smaller at 120m (experiments/throughput/README.md, "Results: the paper's 120M ...").
            self._cross_entropy = torch.compile(cross_entropy)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids)

    def _loss(self, ids: torch.Tensor, reduction: str = "mean", eager: bool = False) -> torch.Tensor:
        """Next-token loss of ids [B, T + 1]. eager: bypass the whole-model compiled graph (train.compile_scope=
        model), whose guards on grad mode would compile a second graph for validation, which takes far longer
        than the eager batches (experiments/throughput/README.md, "The training loop against the benchmark")."""
        inputs, targets = ids[:, :-1], ids[:, 1:]
        model = self.model.forward if eager and self.compile == "model" else self.model
        if self.fused_loss:
            return model(inputs, targets=targets, reduction=reduction)
        return self._cross_entropy(model(inputs), targets, reduction)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch["input_ids"])
        self._watch_loss(loss)
        self._last_ids = batch["input_ids"]
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            datamodule.position.update(batch["state"])  # this batch is consumed: resume after it
        # Not a prog_bar metric: Lightning turns those into Python numbers after every batch (.item(), a wait for
        # the GPU once per step); the progress display reads train/loss at its redraws (egmla.train.progress).
        self.log("train/loss", loss, on_step=True, batch_size=batch["input_ids"].shape[0])
        return loss

    # A non-finite loss is recorded on the device and looked at only at log points, checkpoint saves and the end:
    # reading it every step would stall the host on the GPU once per step and slow the loop (experiments/throughput/
    # README.md, "The training loop against the benchmark").
    def _watch_loss(self, loss: torch.Tensor) -> None:
        if self._first_bad is None or self._first_bad.device != loss.device:
            self._first_bad = torch.tensor([-1.0, 0.0], dtype=torch.float64, device=loss.device)  # step, loss
        bad = ~torch.isfinite(loss.detach()) & (self._first_bad[0] < 0)
        # torch.full, not torch.tensor: a tensor built from Python data is copied to the GPU with a stream sync,
        # which stalled the host once per step just as reading the loss did; full() launches a fill kernel.
        step = torch.full((), float(self.global_step), dtype=torch.float64, device=loss.device)
        self._first_bad = torch.where(bad, torch.stack([step, loss.detach().double()]), self._first_bad)

    def _raise_if_diverged(self, check_weights: bool = False) -> None:
        """NonFiniteLossError if a loss since the start was NaN/inf (or, with check_weights, any weight is, or the
        loss of the weights on the last batch or its gradient is)."""
        step, value = self._first_bad.tolist() if self._first_bad is not None else (-1.0, 0.0)
        finite_weights = 1.0
        check_weights = check_weights and self._weights_checked_step != self.global_step  # no update since
        if check_weights:
            finite = [torch.isfinite(fsdp.local(p)).all() for p in self.model.parameters()]
            finite_weights = float(torch.stack(finite).all() & self._current_weights_train_on())
        if self.trainer.world_size > 1:  # every rank must take the same branch (a save is collective)
            flags = torch.tensor([step, finite_weights], dtype=torch.float64, device=self.device)
            step = self.trainer.strategy.reduce(flags[:1], reduce_op="max").item()
            finite_weights = -self.trainer.strategy.reduce(-flags[1:], reduce_op="max").item()
        if step >= 0:
            raise NonFiniteLossError(f"training loss is {value} at step {int(step)}")
        if not finite_weights:
            raise NonFiniteLossError(
                f"weights blew up by step {self.global_step} (they, their loss or its gradient on the last batch "
                "are not finite); not saved"
            )
        if check_weights:
            self._weights_checked_step = self.global_step

    def _current_weights_train_on(self) -> torch.Tensor:
        """Whether the weights about to be saved give a finite loss and gradient on the last training batch. An
        update can blow weights up to large but finite values (max |w| ~1e6 at lr=1e6) whose loss is still finite
        but whose gradient overflows: the next step makes them NaN at any learning rate, so a checkpoint of them
        would make a resume with a lower one fail again. Same grad mode and precision as training, so a compiled
        model reuses its graph; the gradients the step left are put back afterwards."""
        if self._last_ids is None:
            return torch.tensor(True)
        params = [p for p in self.model.parameters() if p.requires_grad]
        kept = [p.grad for p in params]
        for p in params:
            p.grad = None
        with torch.enable_grad(), self.trainer.precision_plugin.forward_context():
            loss = self._loss(self._last_ids)
        loss.backward()
        grads = [torch.isfinite(fsdp.local(p.grad)).all() for p in params if p.grad is not None]
        for p, grad in zip(params, kept, strict=True):
            p.grad = grad
        return torch.isfinite(loss.detach()) & torch.stack(grads).all()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self._raise_if_diverged()

    def on_train_end(self) -> None:
        # The final weights are checked now, on the device they trained on: when fit returns, Lightning has moved the
        # module to the CPU, and the final step's checkpoint (written after fit, if no periodic one holds it) reuses
        # this check instead of running the model there on a batch left on the GPU.
        self._raise_if_diverged(check_weights=True)

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(4, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Adds up nats and targets (every target: val/loss), and nats and UTF-8 bytes of the targets that stand
        for bytes (val/bpb). Zero-byte targets (EOS) count in the loss but not in bits per byte, where their nats
        would count against no bytes (3.55 bpb instead of 3.42 on a probe batch); nanochat's bpb does the same."""
        ids = batch["input_ids"]
        nats = self._loss(ids, reduction="none", eager=True).double().flatten()
        nbytes = self.token_bytes[ids[:, 1:]].flatten()
        self._val_sums += torch.stack(
            [
                nats.sum(),
                torch.full((), nats.numel(), device=self.device, dtype=torch.float64),
                torch.where(nbytes > 0, nats, 0).sum(),
                nbytes.sum(),
            ]
        )

    def on_validation_epoch_end(self) -> None:
        nats, tokens, byte_nats, nbytes = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum").tolist()
        if tokens == 0:
            return
        self.last_val = {
            "loss": nats / tokens,
            "bpb": byte_nats / math.log(2) / nbytes if nbytes else None,
            "tokens": int(tokens),
        }
        self.last_val_step = self.global_step
        self.log("val/loss", self.last_val["loss"], prog_bar=True)
        if nbytes:
            self.log("val/bpb", self.last_val["bpb"])

    def configure_optimizers(self):
        o = self.optim
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            # Norm gains, biases, the token embedding (tied to the output head) and gate tables: no decay.
            is_table = name.startswith(("embed", "gate_tables"))
            (no_decay if p.ndim < 2 or is_table else decay).append(p)
        fused = o.fused
        if fused == "auto":
            fused = all(p.is_cuda for p in decay + no_decay)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr,
            betas=o.betas,
            eps=o.eps,
            fused=bool(fused),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_scale)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        """The config's optimizer settings win over a resumed checkpoint's (PyTorch would keep the old ones)."""
        o = self.optim
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            scheduler.base_lrs = [o.lr] * len(scheduler.base_lrs)
        for optimizer in self.trainer.optimizers:
            decay, no_decay = optimizer.param_groups
            decay["weight_decay"] = o.weight_decay
            for group in (decay, no_decay):
                group.update(initial_lr=o.lr, betas=o.betas, eps=o.eps)
                group["lr"] = o.lr * self._lr_scale(self.global_step)

    def _lr_scale(self, step: int) -> float:
        """The schedule's multiplier of optim.lr at optimizer step `step`."""
        o = self.optim
        return lr_multiplier(step, self.max_steps, o.warmup_steps, o.schedule, o.min_lr_ratio, o.decay_fraction)

    def on_before_optimizer_step(self, optimizer) -> None:
        # Clipping here rather than through the Trainer: Lightning refuses its own clipping with fused AdamW,
        # which is right for fp16's loss scaling but needless in bf16 and fp32, where gradients are unscaled.
        max_norm = self.optim.grad_clip
        log = self.global_step % max(1, self.trainer.log_every_n_steps) == 0
        if max_norm > 0:
            norm = fsdp.clip_grad_norm_(self.model.parameters(), max_norm)
            if log:
                self.log("train/grad_norm", norm, on_step=True)
        if log:
            self.log("lr", optimizer.param_groups[0]["lr"], on_step=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Raising here stops the save before any file is written: a checkpoint never holds a diverged model.
        self._raise_if_diverged(check_weights=True)
        checkpoint["egmla_model_config"] = asdict(self.model_cfg)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy in fp32 whatever the logits' dtype."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)
