"""On a GPU, the training loop never makes the host wait for the device between log points. One wait per step
(reading the loss back, building a tensor from Python data on the GPU) let the GPU idle while the host queued the
next work: several per cent of tok/s (experiments/throughput/README.md, "The training loop against the benchmark").
The GPU test runs under torch.cuda's sync debug mode (CI skips it; on a GPU machine: `pytest
tests/test_host_sync.py`); the CPU test counts the reads of tensor values into Python that such a wait comes from.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from conftest import overrides, run_training

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class RefuseHostSyncs(L.Callback):
    """torch.cuda's sync debug mode set to raise from the start of step `first` to the end of step `last`: every
    part of those steps (data transfer, forward, loss check, logging, backward, clipping, optimizer, scheduler)."""

    def __init__(self, first: int, last: int):
        self.first, self.last, self.checked = first, last, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.first:
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.first < trainer.global_step <= self.last + 1:
            self.checked.append(trainer.global_step)
        if trainer.global_step == self.last + 1:
            torch.cuda.set_sync_debug_mode("default")


class CountHostReads(RefuseHostSyncs):
    """Counts every Tensor.item, tolist, float(), int() and bool() of a tensor in the same steps."""

    READS = ("item", "tolist", "__float__", "__int__", "__bool__")

    def __init__(self, first: int, last: int, monkeypatch):
        super().__init__(first, last)
        self.active, self.reads = False, []
        for name in self.READS:
            monkeypatch.setattr(torch.Tensor, name, self._counted(name, getattr(torch.Tensor, name)))

    def _counted(self, name, read):
        def counted(tensor, *args):
            if self.active:
                self.reads.append(name)
            return read(tensor, *args)

        return counted

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.active = self.active or trainer.global_step == self.first

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.first < trainer.global_step <= self.last + 1:
            self.checked.append(trainer.global_step)
        if trainer.global_step == self.last + 1:
            self.active = False


def test_steps_between_log_points_read_no_tensor_into_python(corpus, tmp_path, monkeypatch):
    watch = CountHostReads(first=8, last=14, monkeypatch=monkeypatch)
    args = overrides(corpus, tmp_path / "run", "train.max_steps=16", "train.log_every=8", "train.val_every=100")
    args.append("optim.fused=true")  # as on a GPU (the unfused CPU path reads its step counters with .item())
    run_training([*args, "train.ckpt_every=100"], callbacks=[watch])
    assert watch.checked == [9, 10, 11, 12, 13, 14, 15]
    assert watch.reads == []


@needs_cuda
@pytest.mark.parametrize("compile", [False, True])
def test_steps_between_log_points_never_wait_for_the_gpu(corpus, tmp_path, compile):
    watch = RefuseHostSyncs(first=8, last=14)
    args = overrides(corpus, tmp_path / "run", "trainer=gpu", f"train.compile={compile}", "train.max_steps=16")
    # Log points, validation and checkpoints (which read from the GPU on purpose) fall outside steps 9-15.
    args += ["train.log_every=8", "train.val_every=100", "train.ckpt_every=100", "data.num_workers=2"]
    try:
        run_training(args, callbacks=[watch])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert watch.checked == [9, 10, 11, 12, 13, 14, 15]
