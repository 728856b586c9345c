"""train.profile_steps: a profiler record of chosen optimizer steps, its trace and summary (egmla/train/profile.py)."""

from __future__ import annotations

import gzip
import json

import pytest

from conftest import overrides, run_training
from egmla import ConfigError, compose
from egmla.train.main import prepare
from egmla.train.profile import busy_and_gaps


def test_profiled_steps_leave_a_trace_and_a_summary(corpus, tmp_path):
    run_dir = tmp_path / "run"
    results = run_training(overrides(corpus, run_dir, "train.profile_steps=[2,3]"))
    assert results["train"]["profiled_steps"] == [2, 3]
    trace = json.loads(gzip.decompress((run_dir / "profile" / "trace.json.gz").read_bytes()))
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert any(name.startswith("aten::") for name in names)  # the steps' torch ops are on the time line
    summary = (run_dir / "profile" / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("steps 2-3: ") and summary[0].endswith(" ms a step (wall, profiler running)")
    # validation every 3 steps and checkpoints every 2 (conftest): the record, from the end of step 1 to the end of
    # step 3, holds the validation after step 2 and the save after step 1 (Lightning saves after the other hooks)
    assert summary[1] == "inside the record: 1 validation(s), 1 checkpoint save(s)"
    assert summary[2] == "GPU: none recorded (a CPU run)"
    assert any("Self CPU" in line for line in summary)  # the operator table


def test_a_run_that_ends_inside_the_profiled_steps_keeps_them(corpus, tmp_path):
    run_dir = tmp_path / "run"
    results = run_training(overrides(corpus, run_dir, "train.profile_steps=[5,50]"))  # steps 0-5
    assert results["train"]["profiled_steps"] == [5, 5]
    assert (run_dir / "profile" / "summary.txt").read_text().startswith("steps 5-5: ")
    assert not (run_dir / "profile" / "trace.json").exists()  # only the compressed trace stays


def test_a_run_resumed_past_the_profiled_steps_says_so_and_records_none(corpus, tmp_path):
    run_dir = tmp_path / "run"
    run_training(overrides(corpus, run_dir, "train.max_steps=4"))
    with pytest.warns(UserWarning, match="starts at step 2, but this run resumes at step 4: nothing is profiled"):
        results = run_training(overrides(corpus, run_dir, "resume=last", "train.profile_steps=[2,5]"))
    assert results["train"]["profiled_steps"] is None and not (run_dir / "profile").exists()


def test_a_run_resumed_at_the_first_profiled_step_records_it(corpus, tmp_path):
    run_dir = tmp_path / "run"
    run_training(overrides(corpus, run_dir, "train.max_steps=4"))
    results = run_training(overrides(corpus, run_dir, "resume=last", "train.profile_steps=[4,4]"))
    assert results["train"]["profiled_steps"] == [4, 4]
    assert (run_dir / "profile" / "summary.txt").read_text().startswith("steps 4-4: ")


@pytest.mark.parametrize("value", ["[0,3]", "[4,3]", "[3]", "[1.5,2]", "[true,2]", "3"])
def test_bad_profile_steps_are_refused_in_one_line(corpus, tmp_path, value):
    with pytest.raises(ConfigError, match=r"^train.profile_steps=.* is invalid: expected null or \[first, last\]"):
        prepare(compose(overrides(corpus, tmp_path / "run", f"train.profile_steps={value}")))


def test_profile_steps_after_the_last_step_are_refused(corpus, tmp_path):
    with pytest.raises(ConfigError, match=r"^train.profile_steps=\[6, 9\] starts after the run's last step \(5, "):
        prepare(compose(overrides(corpus, tmp_path / "run", "train.profile_steps=[6,9]")))  # steps 0-5


def test_busy_time_and_gaps_of_overlapping_intervals():
    intervals = [(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (6.0, 7.0), (9.0, 10.0), (9.5, 9.7)]
    assert busy_and_gaps(intervals) == (6.0, [(3.0, 5.0), (7.0, 9.0)])


class _Range:
    def __init__(self, start: float, end: float):
        self.start, self.end = start, end

    def elapsed_us(self) -> float:
        return self.end - self.start


class _Event:
    def __init__(self, name: str, device: str, start: float, end: float, thread: int = 1):
        from torch.autograd import DeviceType

        self.name, self.time_range, self.thread = name, _Range(start, end), thread
        self.device_type = DeviceType.CUDA if device == "cuda" else DeviceType.CPU


class _Recorded:
    """What summarize() reads of a torch.profiler.profile: its events (times in microseconds) and operator table."""

    def __init__(self, events: list[_Event]):
        self._events = events

    def events(self) -> list[_Event]:
        return self._events

    def key_averages(self):
        return self

    def table(self, sort_by: str, row_limit: int) -> str:
        return f"(operators by {sort_by})"


def test_summary_names_the_host_wait_under_each_gpu_gap():
    from egmla.train.profile import summarize

    events = [
        _Event("kernel_a", "cuda", 0, 6000),
        _Event("kernel_b", "cuda", 8000, 10000),  # 2 ms idle before it: the host waited in a sync
        _Event("kernel_c", "cuda", 10500, 20000),  # 0.5 ms idle: the host ran Python outside torch's ops
        _Event("aten::copy_", "cpu", 5000, 8100),
        _Event("cudaStreamSynchronize", "cpu", 5500, 7900),
        _Event("aten::mm", "cpu", 1000, 2000),
    ]
    lines = summarize(_Recorded(events), 10, 11, wall=0.04).splitlines()
    assert lines[0] == "steps 10-11: 20.00 ms a step (wall, profiler running)"
    assert lines[1] == "GPU busy 87.5% of 20.0 ms from its first kernel to its last (1.25 ms idle a step)"
    assert lines[3].startswith("longest GPU idle gaps")
    assert lines[4] == (
        "     2.00  +     6.0  cudaStreamSynchronize (1.90 of it), aten::copy_ (2.00 of it)"
    )  # the shortest op spanning most of the gap first: the wait itself, then what called it
    assert lines[5] == "     0.50  +    10.0  (no torch op: Python outside torch)"
    assert lines[-1] == "(operators by self_device_time_total)"


def test_summary_names_each_host_wait_with_the_ops_that_made_it():
    from egmla.train.profile import END_OF_RECORD, summarize

    events = [
        _Event("kernel_a", "cuda", 0, 10000),
        _Event("kernel_b", "cuda", 12000, 20000),
        _Event("Optimizer.step#AdamW.step", "cpu", 0, 8000),  # ended before the wait: not around it
        _Event("cudaStreamSynchronize", "cpu", 3000, 3010),  # 10 us: the GPU was idle, not a wait
        _Event("aten::item", "cpu", 9000, 12000),
        _Event("aten::_local_scalar_dense", "cpu", 9050, 11950),
        _Event("cudaMemcpyAsync", "cpu", 9060, 9080),
        _Event("cudaStreamSynchronize", "cpu", 9100, 11900),  # a tensor read into Python: 2.8 ms
        _Event("autograd::engine::evaluate_function", "cpu", 8500, 12500, thread=2),  # another thread's op
        _Event("aten::to", "cpu", 14000, 14500),
        _Event("cudaMemcpyAsync", "cpu", 14010, 14410),  # a copy to pageable memory that blocked: 0.4 ms
        _Event("cudaDeviceSynchronize", "cpu", 15000, 15200),  # called from Python outside torch's ops
        _Event(END_OF_RECORD, "cpu", 19000, 20100),
        _Event("cudaDeviceSynchronize", "cpu", 19010, 20090),  # the profiler's own: left out
    ]
    lines = summarize(_Recorded(events), 3, 4, wall=0.03).splitlines()
    at = lines.index(
        "host waits for the GPU (synchronize calls and copies of 0.10 ms or more): 3 in 2 step(s), 3.40 ms in all; "
        "longest: ms, start (ms after the first kernel), the ops around it, outermost first"
    )
    assert lines[at + 1 : at + 4] == [
        "     2.80  +     9.1  aten::item > aten::_local_scalar_dense",
        "     0.40  +    14.0  aten::to",
        "     0.20  +    15.0  (no torch op: Python outside torch)",
    ]
    assert lines[at + 4] == "" and lines[-1] == "(operators by self_device_time_total)"
