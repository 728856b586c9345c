"""`train.profile_steps=[first, last]`: a torch.profiler record of optimizer steps first..last on rank zero, to see
where a training loop loses time against `egmla-bench train`. Written to run_dir/profile/:

    trace.json.gz  the Chrome trace: host ops, CUDA runtime calls and kernels on one time line (ui.perfetto.dev)
    summary.txt    wall time a step, the GPU's busy share, its longest idle gaps with the host ops that spanned
                   them (a gap under a cudaStreamSynchronize or a tensor read is a host wait), the top operators

The record runs from the end of step first - 1 to the end of step `last`, so each step's time between batches
(Lightning's hooks, the next batch, its move to the device) is in it. The profiler slows the host down: a
profiled run's tok/s is not a measurement; profile a copy of the run, not the one whose speed you report.
"""

from __future__ import annotations

import gzip
import shutil
import time
from pathlib import Path

import lightning as L
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity

GAPS_LISTED = 10  # idle gaps of the GPU named in summary.txt, longest first
HOST_OPS_PER_GAP = 3  # host ops listed under each gap, by how much of it they cover
TOP_OPERATORS = 25


class StepProfiler(L.Callback):
    def __init__(self, first: int, last: int, out_dir: Path):
        self.first, self.last, self.out_dir = first, last, Path(out_dir)
        self.summary: str | None = None  # summary.txt's text, once written
        self._profiler: torch.profiler.profile | None = None
        self._start = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero or trainer.fit_loop._should_accumulate():
            return
        step = trainer.global_step  # optimizer steps done
        if step == self.first and self._profiler is None and self.summary is None:
            cuda = pl_module.device.type == "cuda"
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.__enter__()
            self._start = time.perf_counter()
        elif step == self.last + 1 and self._profiler is not None:
            self._finish(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._profiler is not None:  # the run ended inside the profiled steps: keep what was recorded
            self._finish(pl_module)

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            self._profiler = None

    def _finish(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        wall = time.perf_counter() - self._start
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        steps = pl_module.trainer.global_step - self.first
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / "trace.json"
        profiler.export_chrome_trace(str(trace))
        with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        trace.unlink()
        self.summary = summarize(profiler, self.first, self.first + steps - 1, wall)
        (self.out_dir / "summary.txt").write_text(self.summary)
        print(f"profile of steps {self.first}-{self.first + steps - 1} -> {self.out_dir}", flush=True)


def summarize(profiler: torch.profiler.profile, first: int, last: int, wall: float) -> str:
    events = profiler.events()
    steps = last - first + 1
    lines = [f"steps {first}-{last}: {1000 * wall / steps:.2f} ms a step (wall, profiler running)"]
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA)
    if not kernels:
        lines.append("GPU: none recorded (a CPU run)")
    else:
        busy, gaps = busy_and_gaps(kernels)
        span = kernels[-1][1] - kernels[0][0]
        lines.append(
            f"GPU busy {busy / span:.1%} of {span / 1000:.1f} ms from its first kernel to its last "
            f"({(span - busy) / 1000 / steps:.2f} ms idle a step)"
        )
        host = [e for e in events if e.device_type == DeviceType.CPU]
        lines.append("\nlongest GPU idle gaps: ms, start (ms after the first kernel), the host ops over them")
        for start, end in sorted(gaps, key=lambda g: g[0] - g[1])[:GAPS_LISTED]:
            lines.append(
                f"  {(end - start) / 1000:7.2f}  +{(start - kernels[0][0]) / 1000:8.1f}  {_host_ops(host, start, end)}"
            )
    sort_by = "self_cuda_time_total" if kernels else "self_cpu_time_total"
    lines += ["", profiler.key_averages().table(sort_by=sort_by, row_limit=TOP_OPERATORS)]
    return "\n".join(lines) + "\n"


def busy_and_gaps(intervals: list[tuple[float, float]]) -> tuple[float, list[tuple[float, float]]]:
    """Time covered by sorted (start, end) intervals, and the gaps between them."""
    busy, gaps = 0.0, []
    start, end = intervals[0]
    for s, e in intervals[1:]:
        if s > end:
            busy += end - start
            gaps.append((end, s))
            start, end = s, e
        else:
            end = max(end, e)
    return busy + end - start, gaps


def _host_ops(host: list, start: float, end: float) -> str:
    """The most specific host ops spanning most of a gap (the shortest of those covering half of it or more),
    else those covering most of it; none: the host ran Python outside torch's ops (hooks, data, logging)."""
    overlapping = [e for e in host if _overlap(e, start, end) > 0]
    spanning = [e for e in overlapping if _overlap(e, start, end) >= (end - start) / 2]
    chosen = (
        sorted(spanning, key=lambda e: e.time_range.elapsed_us())[:HOST_OPS_PER_GAP]
        or sorted(overlapping, key=lambda e: -_overlap(e, start, end))[:HOST_OPS_PER_GAP]
    )
    if not chosen:
        return "(no torch op: Python outside torch)"
    return ", ".join(f"{e.name} ({_overlap(e, start, end) / 1000:.2f} of it)" for e in chosen)


def _overlap(event, start: float, end: float) -> float:
    return max(0.0, min(event.time_range.end, end) - max(event.time_range.start, start))
