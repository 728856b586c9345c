"""The training benchmark runs on CPU and writes the CSV columns experiments/throughput/ expects."""

from __future__ import annotations

import csv

from egmla.bench import CSV_COLUMNS, main


def test_bench_train_smoke_writes_rows(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    argv = ["train", "--size", "tiny", "--seq", "32", "--batch", "2", "--steps", "1", "--warmup", "1",
            "--variants", "mha", "egmla", "--set", "model.vocab_size=257", "--csv", str(out)]  # fmt: skip
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
