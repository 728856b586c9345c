"""`train.profile_steps=[first, last]`: a torch.profiler record of optimizer steps first..last on rank zero, to see
where a training loop loses time against `egmla-bench train`. Steps are numbered as metrics.csv's `step` column
(from 0: step k runs while k steps are done; the progress line prints it as k + 1 when it ends). Written to
run_dir/profile/:

    trace.json.gz  the Chrome trace: host ops, CUDA runtime calls and kernels on one time line (ui.perfetto.dev)
    summary.txt    wall time a step, the GPU's busy share, its longest idle gaps with the host ops that spanned
                   them, the host's waits for the GPU with the ops that made them, the top operators

The record runs from the end of step first - 1 to the end of step `last`, so each step's time between batches
(Lightning's hooks, the next batch, its move to the device) is in it; summary.txt says how many validations and
checkpoint saves fell inside. The profiler slows the host down: a profiled run's tok/s is not a measurement;
profile a copy of the run, not the one whose speed you report. results.json's train.profiled_steps holds the
steps actually recorded (null: none, e.g. a run resumed past `first`).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity

GAPS_LISTED = 10  # idle gaps of the GPU named in summary.txt, longest first
WAITS_LISTED = 10  # host waits named, longest first
WAIT_MIN_US = 100.0  # shorter: the GPU was idle already, or an ordinary launch of a copy (up to ~0.06 ms seen)
OPS_PER_WAIT = 4  # enclosing host ops shown for a wait, outermost first
END_OF_RECORD = "profile: end of record"  # its synchronize is the profiler's, not a wait of the loop
HOST_OPS_PER_GAP = 3  # host ops listed under each gap, by how much of it they cover
TOP_OPERATORS = 25


class StepProfiler(L.Callback):
    def __init__(self, first: int, last: int, out_dir: Path):
        self.first, self.last, self.out_dir = first, last, Path(out_dir)
        self.recorded: list[int] | None = None  # [first, last] of the steps in the trace, once written
        self._profiler: torch.profiler.profile | None = None  # while recording
        self._done: torch.profiler.profile | None = None  # recorded, its summary not yet written
        self._start, self._wall = 0.0, 0.0
        self._validations = self._saves = 0

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and trainer.global_step == self.first:  # resumed just before the first step
            self._begin(pl_module)
        elif trainer.is_global_zero and trainer.global_step > self.first:
            warnings.warn(
                f"train.profile_steps starts at step {self.first}, but this run resumes at step "
                f"{trainer.global_step}: nothing is profiled",
                stacklevel=1,
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero or trainer.fit_loop._should_accumulate():
            return
        step = trainer.global_step  # optimizer steps done: the next one is step `step`
        if step == self.first and self._profiler is None and self.recorded is None:
            self._begin(pl_module)
        elif step == self.last + 1 and self._profiler is not None:
            self._stop(pl_module, step)

    def _begin(self, pl_module) -> None:
        cuda = pl_module.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(pl_module.device)  # the record starts with no earlier step in flight
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        self._profiler = torch.profiler.profile(activities=activities)
        self._profiler.__enter__()
        self._start = time.perf_counter()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._validations += self._profiler is not None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._saves += self._profiler is not None

    def on_train_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._finish(trainer, pl_module)  # what led up to the failure is worth keeping

    def _finish(self, trainer, pl_module) -> None:
        if self._profiler is not None:  # the run ended inside the profiled steps: keep what was recorded
            self._stop(pl_module, trainer.global_step)
        if self._done is not None:
            self._write_summary()

    def _stop(self, pl_module, steps_done: int) -> None:
        """End the record and write the trace; the summary (slow on a long trace) waits for the end of training,
        so that other ranks do not wait for it in their next collective."""
        if pl_module.device.type == "cuda":
            with torch.profiler.record_function(END_OF_RECORD):  # named in the summary's waits, not a loop's
                torch.cuda.synchronize(pl_module.device)
        self._wall = time.perf_counter() - self._start
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        if steps_done <= self.first:  # no step finished inside the record
            return
        self.recorded, self._done = [self.first, steps_done - 1], profiler
        self.out_dir.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(self.out_dir / "trace.json.gz"))  # torch compresses a .gz name

    def _write_summary(self) -> None:
        """summary.txt; a failure here costs the summary, never the run (the trace is written already)."""
        profiler, self._done = self._done, None
        first, last = self.recorded
        try:
            head, rest = summarize(profiler, first, last, self._wall).split("\n", 1)
        except Exception as exc:  # noqa: BLE001 - a diagnostic must not end the training it watches
            warnings.warn(f"profile summary not written ({type(exc).__name__}: {exc}); the trace is", stacklevel=1)
            return
        inside = f"inside the record: {self._validations} validation(s), {self._saves} checkpoint save(s)"
        (self.out_dir / "summary.txt").write_text(f"{head}\n{inside}\n{rest}")
        print(f"profile of steps {first}-{last} -> {self.out_dir}", flush=True)


def summarize(profiler: torch.profiler.profile, first: int, last: int, wall: float) -> str:
    events = profiler.events()
    steps = last - first + 1
    lines = [f"steps {first}-{last}: {1000 * wall / steps:.2f} ms a step (wall, profiler running)"]
    kernels = sorted(  # kernels and copies; not the annotations (compiled regions) that span them on the GPU row
        (e.time_range.start, e.time_range.end)
        for e in events
        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
    )
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
        lines += _host_waits(host, kernels[0][0], steps)
    sort_by = "self_device_time_total" if kernels else "self_cpu_time_total"
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


def _host_waits(host: list, origin: float, steps: int) -> list[str]:
    """summary.txt's host waits: CUDA synchronize calls, and copies that block, each with the host ops of its thread
    around it (an `aten::item` is a tensor read into Python). A wait empties the GPU's queue, so the host's next
    work shows as an idle gap: the gap list names where the GPU idled, this list why its queue was empty. One wait
    a step cost the 120M loop 1-2% of its speed. The profiler's own synchronize at the end of the record is left
    out."""
    ops = [e for e in host if not _is_wait(e)]
    waits = []
    for wait in (e for e in host if _is_wait(e) and e.time_range.elapsed_us() >= WAIT_MIN_US):
        start, end = wait.time_range.start, wait.time_range.end
        around = [  # the ops of its thread that were running when the wait started and did not end before it
            e for e in ops if e.thread == wait.thread and e.time_range.start <= start and e.time_range.end >= end
        ]
        if any(e.name == END_OF_RECORD for e in around):
            continue
        around.sort(key=lambda e: (e.time_range.start, -e.time_range.end))  # outermost first
        waits.append((end - start, start, " > ".join(e.name for e in around[-OPS_PER_WAIT:])))
    lines = [
        "",
        f"host waits for the GPU (synchronize calls and copies of {WAIT_MIN_US / 1000:.2f} ms or more): {len(waits)} "
        f"in {steps} step(s), {sum(w[0] for w in waits) / 1000:.2f} ms in all; longest: ms, start (ms after the "
        "first kernel), the ops around it, outermost first",
    ]
    for elapsed, start, chain in sorted(waits, key=lambda w: -w[0])[:WAITS_LISTED]:
        chain = chain or "(no torch op: Python outside torch)"
        lines.append(f"  {elapsed / 1000:7.2f}  +{(start - origin) / 1000:8.1f}  {chain}")
    return lines


def _is_wait(event) -> bool:
    return "Synchronize" in event.name or event.name.startswith("cudaMemcpy")


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
