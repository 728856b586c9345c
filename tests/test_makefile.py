"""make BIN=dir runs the targets with an existing environment instead of creating .venv."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60)


def test_make_with_bin_uses_that_environment_and_creates_no_venv(tmp_path):
    bin_dir, venv = tmp_path / "bin", tmp_path / "venv"
    bin_dir.mkdir()
    (bin_dir / "egmla-bench").write_text("#!/bin/sh\n")
    (bin_dir / "egmla-bench").chmod(0o755)
    done = make("setup", f"BIN={bin_dir}", f"VENV={venv}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert not venv.exists()
    planned = make("-n", "bench", f"BIN={bin_dir}", "THROUGHPUT_CSV=out.csv").stdout
    assert f"{bin_dir}/egmla-bench train --size 120m --seq 2048 --batch 16 --csv out.csv" in planned


def test_make_with_a_bin_without_egmla_says_so(tmp_path):
    done = make("bench", f"BIN={tmp_path}", f"VENV={tmp_path / 'venv'}")
    assert done.returncode != 0
    assert f"BIN={tmp_path} has no egmla-bench: pip install egmla into that environment" in done.stdout
    assert not (tmp_path / "venv").exists()


def test_small_study_targets_run_sweep_eval_and_table_offline(tmp_path):
    """make reproduce-table1-small / -gate-dim-small (dry run): the sweep with its time budget, the offline
    evaluation of every row, then the table; nothing needs the network."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "egmla-bench").write_text("#!/bin/sh\n")
    (bin_dir / "egmla-bench").chmod(0o755)
    targets = [
        ("reproduce-table1-small", "table1_small"),
        ("reproduce-gate-dim-small", "gate_dim_small"),
        ("reproduce-scaling-small", "scaling_small"),
    ]
    for target, sweep in targets:
        planned = make(
            "-n",
            "-W",
            "data/code/fingerprint.json",
            "-W",
            "data/eval/tasks",
            target,
            f"BIN={bin_dir}",
            "SWEEP_BUDGET=500",
            "SMALL_EVAL_LIMIT=100",
        ).stdout
        assert f"HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 {bin_dir}/egmla-sweep sweeps/{sweep}.yaml" in planned
        assert f"--out runs/sweeps/{sweep} --time-budget 500" in planned
        evaluation = f"{bin_dir}/egmla-eval checkpoint={{run_dir}} eval=offline eval.limit=100 eval.batch_size=128"
        assert f'--eval "{evaluation}"' in planned
        assert f"{bin_dir}/egmla-table runs/sweeps/{sweep} --out experiments/{sweep}" in planned
    planned = make("-n", "-B", "data/code/fingerprint.json", f"BIN={bin_dir}").stdout  # what the study builds
    assert "-m egmla.data.code_corpus --out data/code --min-tokens 150000000" in planned


def test_bench_loop_measures_the_benchmark_then_the_loop_then_tables_both(tmp_path):
    """make bench-loop (dry run): the benchmark of the three variants, 400 steps of each through egmla-train on
    the code corpus in a cleared runs/loop/, then loop_vs_bench.py over exactly those runs and that CSV."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "egmla-bench").write_text("#!/bin/sh\n")
    (bin_dir / "egmla-bench").chmod(0o755)
    args = ("-n", "-W", "data/code/fingerprint.json", "bench-loop", f"BIN={bin_dir}", "THROUGHPUT_CSV=out.csv")
    planned = make(*args).stdout.splitlines()
    steps = [line for line in planned if not line.startswith(("test -x", "\t"))]
    assert (
        steps[0]
        == f"{bin_dir}/egmla-bench train --size 120m --seq 2048 --batch 16 --variants mha mla egmla --csv out.csv"
    )
    assert steps[1] == "rm -rf runs/loop"
    assert "experiment=table1_small/${row#*:}" in steps[2] and "mla-kv256:mla_base" in steps[2]
    assert "train.max_tokens=13107200 train.val_every=100000 run_dir=runs/loop/${row#*:}" in "\n".join(planned)
    assert planned[-1].split() == [
        "mha=runs/loop/mha",
        "mla-kv256=runs/loop/mla_base",
        "egmla-kv64-g256=runs/loop/egmla_kv64",
    ]
    assert f"{bin_dir}/python experiments/throughput/loop_vs_bench.py --csv out.csv" in "\n".join(planned)
