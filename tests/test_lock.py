"""One writer per folder (egmla.lock): a trainer or an evaluation refuses a run dir another process holds, and a
holder that died never blocks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from conftest import offline_env, overrides
from egmla.lock import FolderLocked, hold
from egmla.train import main as train_main

HOLDER = """
import sys, time
from egmla.lock import hold
with hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_lock_whose_holder_was_killed_does_not_block(tmp_path):
    folder = tmp_path / "run"
    env = offline_env(PYTHONPATH=os.pathsep.join(filter(None, [*sys.path, os.environ.get("PYTHONPATH")])))
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLDER), str(folder)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderLocked, match=f"folder {folder} is in use by PID {holder.pid} on "), hold(folder):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)  # no Python code runs: the kernel drops the lock
        holder.communicate()
    with hold(folder) as path:  # taken at once, and now names this process
        assert path.read_text().startswith(f"PID {os.getpid()} on ")


def test_a_second_trainer_into_a_held_run_dir_is_refused_in_one_line(corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    with hold(run_dir, "run dir") as lock:
        owner = lock.read_text()
        assert train_main.main(overrides(corpus, run_dir)) == 2
        assert lock.read_text() == owner
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and not captured.out.strip(), captured
    assert err[0].startswith(f"egmla-train: error: run dir {run_dir} is in use by PID {os.getpid()} on ")
    assert [p.name for p in run_dir.iterdir()] == [".lock"]  # nothing written


def test_only_rank_zero_takes_the_run_dir_lock(tmp_path, monkeypatch):
    """The ranks a launcher starts (RANK/LOCAL_RANK set) share rank zero's run dir: they must not be refused."""
    monkeypatch.setattr(train_main, "_train", lambda prepared, callbacks: "trained")
    prepared = SimpleNamespace(run_dir=tmp_path / "run")  # train() reads only run_dir before _train
    with hold(prepared.run_dir):
        with pytest.raises(FolderLocked):
            train_main.train(prepared)
        monkeypatch.setenv("LOCAL_RANK", "1")
        assert train_main.train(prepared) == "trained"
    monkeypatch.delenv("LOCAL_RANK")
    assert train_main.train(prepared) == "trained"  # released when the holder's block ended
