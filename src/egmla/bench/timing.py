"""GPU time of a callable by CUDA events: what the benchmarks and the GPU scripts under experiments/ time with."""

from __future__ import annotations

from collections.abc import Callable

import torch


def cuda_milliseconds(fn: Callable[[], object], steps: int, warmup: int = 0) -> float:
    """Mean milliseconds per call of fn over `steps` calls on the current CUDA stream, after `warmup` untimed
    calls; the GPU is drained before the first timed call and after the last."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / steps
