"""The training benchmark runs on CPU and writes the CSV columns experiments/throughput/ expects."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch

from conftest import load_script, offline_env, words
from egmla.bench import main
from egmla.bench.train import CSV_COLUMNS
from egmla.config import build_model, compose


def test_bench_train_smoke_writes_rows(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    argv = [
        *words(
            "train --size tiny --seq 32 --batch 2 --steps 1 --warmup 1 --variants "
            "mha egmla --set model.vocab_size=257 --csv"
        ),
        str(out),
    ]
    assert main(argv) == 0
    assert "vs mha" in capsys.readouterr().out
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert (
        list(rows[0])
        == CSV_COLUMNS
        == ["variant", "size", "seq", "batch", "gpus", "card", "tok_per_s", "mfu", "peak_mem_gib", "date", "commit"]
    )
    assert [r["variant"] for r in rows] == ["mha", "egmla-kv16-g32"]
    assert all(float(r["tok_per_s"]) > 0 and r["card"] == "cpu" for r in rows)


def test_bench_train_windows_split_the_timed_steps(capsys):
    """--window N: one rate per whole N timed steps (7 steps, N = 3: two rates; the last step is in no window)."""
    argv = words("train --size tiny --seq 32 --batch 2 --steps 7 --warmup 1 --window 3 --variants mha")
    assert main([*argv, "--set", "model.vocab_size=257"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("  tok/s per 3 steps: "))
    rates = [float(rate.replace(",", "")) for rate in line.split(": ")[1].split()]
    assert len(rates) == 2 and all(rate > 0 for rate in rates)
    assert main([*argv[:-4], "--window=-1", "--variants", "mha"]) == 2  # argv without "--window 3 ..."
    assert "--window -1 is invalid" in capsys.readouterr().err


def test_bench_train_entries_with_their_own_overrides(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    argv = [
        *words(
            "train --size tiny --seq 32 --batch 2 --steps 1 --warmup 0 --variants "
            "egmla egmla:attention.gate_norm=rmsnorm:attention.gate_kv=shared --set "
            "model.vocab_size=257 --csv"
        ),
        str(out),
    ]
    assert main(argv) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == [
        "egmla-kv16-g32",
        "egmla-kv16-g32-rms-shkv:attention.gate_norm=rmsnorm:attention.gate_kv=shared",
    ]
    capsys.readouterr()
    assert main([*argv[:-2], "--variants", "egmla:attention.bogus=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("[1/1] egmla:attention.bogus=1: 0 warm-up steps, then 1 timed"), err  # progress
    assert len(err) == 2 and err[1].startswith("egmla-bench: error:") and "attention.bogus" in err[1], err


def test_bench_train_sharded_path_runs_on_two_cpu_processes(tmp_path):
    """--gpus 2 relaunches itself under torchrun and shards with FSDP2 (gloo here, NCCL on GPUs)."""
    out = tmp_path / "bench.csv"
    argv = [
        *words(
            "train --size tiny --seq 32 --batch 2 --steps 2 --warmup 1 --gpus 2 "
            "--variants egmla --ac selective --prefetch 2 --set "
            "model.vocab_size=257 --csv"
        ),
        str(out),
    ]
    env = offline_env()
    done = subprocess.run([sys.executable, "-m", "egmla.bench", *argv], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["variant"] == "egmla-kv16-g32" and float(rows[0]["tok_per_s"]) > 0


def test_frozen_tables_experiment_freezes_the_gate_tables_alone(tmp_path):
    """experiments/throughput/frozen_tables.py: its models train everything but the gate tables, and it runs."""
    frozen_tables = load_script("experiments/throughput/frozen_tables.py")
    torch.manual_seed(0)
    model = frozen_tables.frozen_gate_tables(build_model)(compose(["model=tiny", "attention=egmla"]))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # as the benchmark builds it: every parameter
    model(torch.randint(0, 97, (2, 16))).float().square().mean().backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == set(before) - {name for name in before if name.startswith("gate_tables")}
    assert any(name.startswith("gate_tables") for name in before)

    argv = [sys.executable, frozen_tables.__file__, *words("--size tiny --seq 32 --batch 2 --steps 1 --warmup 0")]
    done = subprocess.run(argv, env=offline_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    variants = [line.split()[0] for line in done.stdout.splitlines()[1:]]
    assert variants == ["mla-kv64", "egmla-kv16-g32", "egmla-kv16-g32-frozen-tables"], done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
@pytest.mark.parametrize("argv", [["train", "--variants", "mha"], ["decode", "--context", "16384", "--batch", "32"]])
def test_bench_refuses_a_real_size_without_a_gpu(argv, capsys):
    assert main([*argv, "--size", "120m"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--size 120m needs a CUDA GPU and none is visible" in err[0]
