"""GPU time of a callable by CUDA events: what the benchmarks and the GPU scripts under experiments/ time with;
and the benchmarks' refusal of a GPU-sized model on a host without a GPU."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch


def bench_device(size: str) -> torch.device | None:
    """The device a benchmark of model `size` runs on; None, after one line on stderr, for a model above tiny
    without a GPU (a 120M+ model's steps, or its 16K-context caches, would fill most hosts' memory)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if size == "tiny":
        return torch.device("cpu")
    print(
        f"egmla-bench: error: --size {size} needs a CUDA GPU and none is visible: run it on a GPU machine, "
        "or check the benchmark itself on the CPU with --size tiny",
        file=sys.stderr,
    )
    return None


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
