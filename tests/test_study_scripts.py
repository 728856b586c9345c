"""The scripts that print the study READMEs' tables (experiments/readme_tables.py, experiments/throughput/
loop_vs_bench.py), checked on a small made-up study against figures computed here by hand; and the data stream's
pace timer (experiments/throughput/loader_pace.py) on a config composed as egmla-train composes it."""

from __future__ import annotations

import csv
import json
import sys

import pytest

from conftest import load_script

COLUMNS = "run_dir attention variant kv_lora_rank gate_dim seed kv_bytes_per_token val_loss val_bpb tok_per_s"
COLUMNS += " train_loss_at_equal_time avg_acc equal_time_s train_tokens"


def write_run(root, trial: str, attention: str, gate_dim: str, val: dict[int, float]) -> dict:
    run = root / "runs" / trial
    (run / "csv" / "version_0").mkdir(parents=True)
    with open(run / "csv" / "version_0" / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["step", "train/loss", "val/loss"])
        writer.writeheader()
        writer.writerows({"step": step - 1, "train/loss": 3.0, "val/loss": loss} for step, loss in val.items())
    (run / "results.json").write_text(json.dumps({"train": {"steps": max(val), "tokens": 40_000_000}}))
    return dict(
        run_dir=str(run),
        attention=attention,
        variant="egmla",
        kv_lora_rank="64",
        gate_dim=gate_dim,
        seed="1",
        kv_bytes_per_token="3072",
        val_loss=str(val[max(val)]),
        val_bpb="0.9",
        tok_per_s="360000.4",
        train_loss_at_equal_time="1.6",
        avg_acc="0.3412",
        equal_time_s="100",
        train_tokens="40000000",
    )


def test_readme_tables_print_every_row_and_the_validations(tmp_path, capsys):
    rows = [
        write_run(tmp_path, "trial-002", "egmla-kv64-g64", "64", {10: 2.5, 20: 1.75}),
        write_run(tmp_path, "trial-001", "egmla-kv64-g256", "256", {10: 2.25, 20: 1.5}),
    ]
    with open(tmp_path / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS.split())
        writer.writeheader()
        writer.writerows(rows)
    load_script("experiments/readme_tables.py").main(tmp_path)
    out = capsys.readouterr().out.splitlines()
    assert out[2] == "| 001 | EG-MLA kv64, gate_dim 256, seed 1 | 3,072 | 1.5000 | 0.9000 | 360,000 | 1.6000 | 34.12 |"
    assert "| row | 20.0M | 40.0M |" in out  # 40M tokens in 20 steps: validations at 20M and 40M
    assert "| EG-MLA kv64, gate_dim 64, seed 1 | 2.500 | 1.750 |" in out


def test_loop_vs_bench_takes_the_harmonic_mean_of_steady_windows(tmp_path, monkeypatch, capsys):
    run = tmp_path / "loop"
    (run / "csv" / "version_0").mkdir(parents=True)
    with open(run / "csv" / "version_0" / "metrics.csv", "w") as f:  # the first window (compilation) is left out
        f.write("step,perf/tok_per_s\n19,1000\n39,300000\n59,600000\n")
    (run / "environment.json").write_text(json.dumps({"git": {"commit": "abcdef123"}}))
    script = load_script("experiments/throughput/loop_vs_bench.py")
    bench = tmp_path / "results.csv"
    bench.write_text(
        "variant,size,seq,batch,gpus,card,tok_per_s,mfu,peak_mem_gib,date,commit\n"
        "mha,120m,2048,16,1,H200,500000,0.5,13,2026-12-04,abcdef1\n"
        "mha,120m,2048,32,1,H200,520000,0.5,30,2026-12-04,abcdef1\n"  # another batch: not this loop's
    )
    monkeypatch.setattr(script, "HERE", tmp_path)  # results.csv is read from here by default
    monkeypatch.setattr(sys, "argv", ["loop_vs_bench.py", "--bench-commit", "abcdef1", f"mha={run}"])
    script.main()
    row = capsys.readouterr().out.splitlines()[-1]
    # equal-token windows at 300K and 600K tok/s: 2 windows of N tokens in N/300K + N/600K s = 400K tok/s
    assert row == f"| mha | {run} | abcdef1 | 400,000 | metric log, 2 windows | 500,000 | 0.800 |"
    with open(bench, "a") as f:  # a newer benchmark of the same settings: the default compares against it
        f.write("mha,120m,2048,16,1,H200,450000,0.5,13,2026-12-05,fedcba9\n")
    monkeypatch.setattr(sys, "argv", ["loop_vs_bench.py", f"mha={run}"])
    script.main()
    assert capsys.readouterr().out.splitlines()[-1].endswith("| 450,000 | 0.889 |")
    monkeypatch.setattr(sys, "argv", ["loop_vs_bench.py", "--windows", f"mha={run}"])
    script.main()
    out = capsys.readouterr().out.splitlines()
    assert out[-3:] == ["| variant | loop run | 39 | 59 |", "|---|---|---:|---:|", f"| mha | {run} | 0.667 | 1.333 |"]
    timed = tmp_path / "timed"  # a run that logged perf/between_batches: its shares follow, the first window left out
    (timed / "csv" / "version_0").mkdir(parents=True)
    (timed / "csv" / "version_0" / "metrics.csv").write_text(
        "step,perf/tok_per_s,perf/between_batches,perf/garbage_collection\n19,1000,0.9,0.5\n39,300000,0.1,0\n"
        "59,600000,0.25,0.125\n"
    )
    monkeypatch.setattr(sys, "argv", ["loop_vs_bench.py", "--windows", f"mha={run}", f"mha={timed}"])
    script.main()
    out = capsys.readouterr().out.splitlines()
    assert out[-11:] == [
        "Share of each window between batches (perf/between_batches)",
        "",
        "| variant | loop run | 39 | 59 |",
        "|---|---|---:|---:|",
        f"| mha | {timed} | 0.100 | 0.250 |",
        "",
        "Share of each window in Python's garbage collector (perf/garbage_collection)",
        "",
        "| variant | loop run | 39 | 59 |",
        "|---|---|---:|---:|",
        f"| mha | {timed} | 0.000 | 0.125 |",
    ]
    with pytest.raises(SystemExit, match="no benchmark row of mla-kv256"):
        monkeypatch.setattr(sys, "argv", ["loop_vs_bench.py", "--bench-commit", "abcdef1", f"mla-kv256={run}"])
        script.main()


def test_loader_pace_times_every_batch_of_the_configs_stream(corpus, tmp_path, monkeypatch, capsys):
    from omegaconf import OmegaConf

    from conftest import overrides
    from egmla import compose

    config = tmp_path / "config.yaml"
    OmegaConf.save(compose(overrides(corpus, tmp_path / "run")), config)
    script = load_script("experiments/throughput/loader_pace.py")
    argv = [str(config), "--pace-ms", "0", "--batches", "10", "--group", "4", "--head-start", "0"]
    monkeypatch.setattr(sys, "argv", ["loader_pace.py", *argv])
    script.main()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("first batch after ") and "0 workers, shuffle_window 8, batch 4 x 32" in out[0]
    assert [line.split(":")[0] for line in out[1:4]] == [
        "batches     1-    4",
        "batches     5-    8",
        "batches     9-   10",
    ]
    assert all("; move mean " in line for line in out[1:4])  # Lightning's walk of each batch, timed apart
    assert out[4].startswith("all: ") and " in 10 batches (100.0% of the time); moves " in out[4]  # no pace: waits


def test_gpu_busy_reports_each_stretch_above_the_power_threshold(tmp_path, monkeypatch, capsys):
    def line(second: int, clock: int, watts: float, busy: int) -> str:
        return f"2026/12/04 17:00:{second:02d}.500, 40, {clock} MHz, {watts} W, {busy} %"

    samples = [(345, 80.0, 0), (1700, 690.0, 50), (1700, 695.0, 100), (1600, 690.0, 90), (1980, 300.0, 20)]
    samples += [(1980, 120.0, 0), (1800, 650.0, 95), (1800, 120.0, 0)]  # a stretch of one sample: left out
    log = tmp_path / "gpu.csv"
    header = "timestamp, temperature.gpu, clocks.sm [MHz], power.draw [W], utilization.gpu [%]"
    log.write_text("\n".join([header, *(line(i, *s) for i, s in enumerate(samples))]) + "\n2026/12/04 17:00:59")
    script = load_script("experiments/throughput/gpu_busy.py")
    monkeypatch.setattr(sys, "argv", ["gpu_busy.py", str(log)])
    script.main()
    # samples 1-3 are above 400 W; the first and last of a stretch are left out of its figures
    assert capsys.readouterr().out.splitlines() == [
        "17:00:01-17:00:03    1 samples  utilisation 100-100% (mean 100.0)  SM clock mean 1700 MHz"
    ]
