"""Training throughput and model FLOPs utilisation (MFU), logged as perf/tok_per_s and perf/mfu.

MFU convention (docs/design.md): flops_per_token (6 x matmul params + 6 x layers x heads x (d_qk + d_v) x seq,
no causal discount) x tokens/s / (bf16 dense peak of the GPU x GPUs). No MFU on CPUs (no agreed peak).
"""

from __future__ import annotations

import gc
import time

import lightning as L
import torch

# bf16 dense tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name(). Not Lightning's
# get_available_flops / ThroughputMonitor: lightning 2.6 returns None for "NVIDIA H200" (it parses only "H200
# SXM1"/"NVL1" names) and lists H200 and H100 NVL bf16 at the sparse peak (2.0e15, 1.98e15: twice the dense one);
# ThroughputMonitor synchronises the GPU every batch and counts checkpoint writes in its windows (see Throughput).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


class Throughput(L.Callback):
    """Tokens per second (all ranks) over windows of `log_every` optimizer steps, and MFU.

    A window is wall time between log points, data loading included; validation and checkpoint writes are
    excluded (the writes are counted apart in checkpoint_seconds: a 1.2B model's sharded checkpoint takes about
    as long as 150 training steps). The GPU is synchronised only at log points. results.json reports the steady
    state: every window but the first.

    perf/between_batches: the share of a window's wall time the host spent between one batch's end hook and the next
    batch's start hook: the other callbacks' end hooks, fetching the next batch, moving it to the device. The GPU
    still works through queued steps meanwhile, so a high share costs speed only if it outlasts that queue; a data
    loader that falls behind shows up here first (and so do periodic evaluations, which run in those hooks). With
    several ranks Lightning also waits for the GPU there once per batch (its SIGTERM broadcast reads a tensor), so
    the share then holds GPU time too. perf/garbage_collection: the share spent in Python's garbage collector
    (this process, any thread), a pause that stalls the host wherever it falls: after compilation the heap holds
    millions of objects, so a full collection takes long. A collection between batches counts in both shares.
    """

    def __init__(self, flops_per_token: float, tokens_per_batch: int, log_every: int):
        self.flops_per_token = flops_per_token
        self.tokens_per_batch = tokens_per_batch  # one micro-batch on one rank
        self.log_every = max(1, log_every)
        self.windows: list[tuple[int, float]] = []  # (tokens, seconds) per closed window, this process
        self.between_batches: list[float] = []  # host seconds between batches, per closed window
        self.garbage_collection: list[float] = []  # seconds in Python's garbage collector, per closed window
        self.peak_flops_total: float | None = None  # all devices' bf16 peak, FLOP/s (None: no known peak)
        self._window_tokens = 0
        self._window_start: float | None = None
        self._window_between = 0.0
        self._batch_end: float | None = None  # when this callback's last end hook returned (None: new window)
        self._window_gc = 0.0
        self._gc_start: float | None = None
        self._gc_at_save = 0.0
        self.checkpoint_seconds = 0.0  # this process's time in checkpoint writes
        self._save_start: float | None = None

    def _now(self, pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        # Recorded now: after fit, Lightning moves the module back to the CPU.
        self.peak_flops_total = (peak_flops(pl_module.device) or 0.0) * trainer.world_size or None
        self._window_start = self._batch_end = None  # a second fit with this callback starts a new window
        if self._time_gc not in gc.callbacks:
            gc.callbacks.append(self._time_gc)

    def _stop_timing_gc(self) -> None:
        if self._time_gc in gc.callbacks:
            gc.callbacks.remove(self._time_gc)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._stop_timing_gc()

    def _time_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        elif self._gc_start is not None:
            self._window_gc += time.perf_counter() - self._gc_start
            self._gc_start = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # Lightning runs ModelCheckpoint after the other callbacks, so a save falls between two of our hooks:
        # it has ended by the next one, which takes its time out of the window (with one batch's dequeue, ~0).
        self._save_start = time.perf_counter()
        self._gc_at_save = self._window_gc

    def _leave_out_checkpoint(self) -> None:
        if self._save_start is None:
            return
        seconds = time.perf_counter() - self._save_start
        self.checkpoint_seconds += seconds
        if self._window_start is not None:
            self._window_start += seconds
            self._window_gc = self._gc_at_save  # collections during the save are the save's
        if self._batch_end is not None:
            self._batch_end += seconds
        self._save_start = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._leave_out_checkpoint()
        if self._window_start is None:
            self._window_start = self._now(pl_module)
            self._window_gc = 0.0  # collections during validation are not this window's
        elif self._batch_end is not None:
            self._window_between += time.perf_counter() - self._batch_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._leave_out_checkpoint()  # in case a checkpoint callback ran before this one
        self._window_tokens += self.tokens_per_batch * trainer.world_size
        if not (trainer.fit_loop._should_accumulate() or trainer.global_step % self.log_every):
            self._close_window(pl_module)
        self._batch_end = time.perf_counter()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._leave_out_checkpoint()
        if self._window_start is not None and self._window_tokens:
            self._close_window(pl_module, log=False)
        self._window_start = self._batch_end = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._leave_out_checkpoint()
        if self._window_start is not None and self._window_tokens:
            self._close_window(pl_module, log=False)
        self._stop_timing_gc()

    def _close_window(self, pl_module, log: bool = True) -> None:
        elapsed = self._now(pl_module) - self._window_start
        self.windows.append((self._window_tokens, elapsed))
        self.between_batches.append(self._window_between)
        self.garbage_collection.append(self._window_gc)
        if log and elapsed > 0:
            tok_per_s = self._window_tokens / elapsed
            # Not prog_bar: the display reads it at its redraws (progress.READ_AT_REDRAW says why).
            pl_module.log("perf/tok_per_s", tok_per_s, on_step=True, rank_zero_only=True)
            pl_module.log("perf/between_batches", self._window_between / elapsed, on_step=True, rank_zero_only=True)
            pl_module.log("perf/garbage_collection", self._window_gc / elapsed, on_step=True, rank_zero_only=True)
            if self.peak_flops_total:
                mfu = self.flops_per_token * tok_per_s / self.peak_flops_total
                pl_module.log("perf/mfu", mfu, on_step=True, rank_zero_only=True)
        self._window_tokens, self._window_between, self._window_gc = 0, 0.0, 0.0
        self._window_start = time.perf_counter()

    @property
    def steady_tok_per_s(self) -> float | None:
        """Tokens/s over all windows but the first, which holds compilation and warm-up (all, if only one)."""
        seconds = self._steady_seconds()
        return sum(t for t, _ in _steady(self.windows)) / seconds if seconds else None

    def steady_share(self, per_window: list[float]) -> float | None:
        """Share of the steady windows' wall time in `per_window` (between_batches, garbage_collection)."""
        seconds = self._steady_seconds()
        return sum(_steady(per_window)) / seconds if seconds else None

    def _steady_seconds(self) -> float:
        return sum(s for _, s in _steady(self.windows))

    @property
    def steady_mfu(self) -> float | None:
        tok_per_s = self.steady_tok_per_s
        return self.flops_per_token * tok_per_s / self.peak_flops_total if self.peak_flops_total and tok_per_s else None


def _steady(per_window: list) -> list:
    """Every window but the first (compilation, warm-up); the only one if there is one."""
    return per_window[1:] or per_window
