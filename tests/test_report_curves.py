"""egmla-table's loss curves, speed columns and seed spread, from hand-made run directories: results.json plus
Lightning-style csv/version_N/metrics.csv logs whose series, tokens and times are checked against hand arithmetic."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib.image
import pytest

from egmla.report import collect, main, seed_groups
from egmla.report_curves import labels, metric_files, read_curve, tokens_per_step
from test_report import md_rows, rows, write_run

COLUMNS = ["epoch", "lr", "perf/tok_per_s", "step", "train/grad_norm", "train/loss", "val/bpb", "val/loss"]
PNG = b"\x89PNG\r\n\x1a\n"


def train_row(step: int, loss: float, rate: float | None = None) -> dict:
    return {"epoch": 0, "lr": 1e-3, "step": step, "train/grad_norm": 1.0, "train/loss": loss, "perf/tok_per_s": rate}


def val_row(step: int, loss: float) -> dict:
    return {"epoch": 0, "step": step, "val/loss": loss, "val/bpb": loss / 2}


def write_metrics(path: Path, log: list[dict]) -> None:
    """A metrics.csv as Lightning's CSVLogger writes it: every column on every row, missing cells empty."""
    path.parent.mkdir(parents=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: "" if row.get(k) is None else row[k] for k in COLUMNS} for row in log)


def logged_run(
    root: Path,
    name: str,
    logs: dict[int, list[dict]] | None,
    *,
    size: str = "tiny",
    kv: int = 64,
    seed: int = 1,
    shape: tuple[int, int, int, int] = (4, 32, 1, 1),
    steps: int = 10,
    tok_per_s: float | None = 1000.0,
    loss: float | None = 3.0,
    lr: float = 1e-3,
    resume: str | None = None,
) -> Path:
    """An MLA run as egmla-train writes it, shape = (batch, seq_len, devices, accumulation), logs = csv version ->
    rows (None: no csv logs at all)."""
    path = write_run(root, name, size, "mla", kv, loss=loss)
    data = json.loads((path / "results.json").read_text())
    batch, seq_len, devices, accumulate = shape
    data["config"] |= {
        "seed": seed,
        "run_name": name,
        "run_dir": str(path),
        "resume": resume,
        "data": {"batch_size": batch, "seq_len": seq_len},
        "trainer": {"devices": devices, "accumulate_grad_batches": accumulate},
        "optim": {"lr": lr},
    }
    tokens = steps * batch * seq_len * devices * accumulate
    data["train"] = {"steps": steps, "tokens": tokens, "tok_per_s": tok_per_s, "mfu": 0.25, "devices": devices}
    (path / "results.json").write_text(json.dumps(data))
    for version, log in (logs or {}).items():
        write_metrics(path / "csv" / f"version_{version}" / "metrics.csv", log)
    return path


def curve_of(path: Path):
    return read_curve(path, json.loads((path / "results.json").read_text()))


def ema_by_hand(values: list[float]) -> list[float]:
    """s_i = sum_j 0.2 * 0.8^(i-j) x_j / (1 - 0.8^(i+1)), written out."""
    return [
        sum(0.2 * 0.8 ** (i - j) * values[j] for j in range(i + 1)) / (1 - 0.8 ** (i + 1)) for i in range(len(values))
    ]


def test_curve_series_equal_the_csv(tmp_path):
    # 4 x 32 tokens x 2 devices x 3 micro-batches = 768 tokens per step; logged every 5 steps (rows at 4, 9, 14, 19),
    # validated in fit after step 10 (row 9) and after fit at the end (row 20, written at global_step)
    losses = [6.0, 5.0, 4.5, 4.2]
    log = [train_row(s, x) for s, x in zip((4, 9), losses[:2], strict=True)] + [val_row(9, 4.8)]
    log += [train_row(s, x) for s, x in zip((14, 19), losses[2:], strict=True)] + [val_row(20, 4.1)]
    path = logged_run(tmp_path, "run", {0: log}, shape=(4, 32, 2, 3), steps=20, tok_per_s=None)
    curve = curve_of(path)
    assert curve.tokens_per_step == 768
    assert curve.steps == [4, 9, 14, 19] and curve.loss == losses
    assert curve.tokens == [5 * 768, 10 * 768, 15 * 768, 20 * 768]
    assert curve.val_loss == [4.8, 4.1] and curve.val_tokens == [10 * 768, 20 * 768]  # capped at train.tokens
    assert curve.smooth == pytest.approx(ema_by_hand(losses))
    assert curve.smooth[:2] == pytest.approx([6.0, (0.16 * 6.0 + 0.2 * 5.0) / 0.36])
    assert curve.seconds is None and curve.time_source is None  # no perf/tok_per_s, no train.tok_per_s

    # without data.batch_size / seq_len: train.tokens / train.steps
    data = json.loads((path / "results.json").read_text())
    del data["config"]["data"]
    assert tokens_per_step(data) == 20 * 768 / 20


def test_time_from_logged_windows_by_hand(tmp_path):
    # 100 tokens per step (batch 1 x 100), logged every 5 steps; steady tok/s 1000. The first window (compilation)
    # is taken at the steady rate: 500 / 1000 = 0.5 s, then 500 / 500 = 1 s, 500 / 2000 = 0.25 s, 500 / 1000 = 0.5 s.
    log = [train_row(4, 6.0, rate=50.0), train_row(9, 5.0, rate=500.0), val_row(9, 5.1)]
    log += [train_row(14, 4.5, rate=2000.0), train_row(19, 4.0, rate=1000.0), val_row(20, 4.2)]
    curve = curve_of(logged_run(tmp_path, "run", {0: log}, shape=(1, 100, 1, 1), steps=20, tok_per_s=1000.0))
    assert curve.time_source == "windows"
    assert curve.seconds == pytest.approx([0.5, 1.5, 1.75, 2.25])
    assert curve.val_seconds == pytest.approx([1.5, 2.25])

    # no logged windows: tokens / steady tok/s
    bare = [{k: v for k, v in row.items() if k != "perf/tok_per_s"} for row in log]
    curve = curve_of(logged_run(tmp_path, "bare", {0: bare}, shape=(1, 100, 1, 1), steps=20, tok_per_s=400.0))
    assert curve.time_source == "steady"
    assert curve.seconds == pytest.approx([500 / 400, 1000 / 400, 1500 / 400, 2000 / 400])


def test_resumed_versions_concatenate_by_step(tmp_path):
    # version_0 logs steps 0-3; the resume from the step-2 checkpoint redoes 2-3 in version_2 (version_1 crashed
    # before logging: no metrics.csv) and goes on to 5; version_10 redoes 5 and ends at 7. Numeric order matters:
    # as text, version_10 sorts before version_2.
    v0 = [train_row(s, 10.0 + s, rate=100.0) for s in range(4)]
    v2 = [train_row(s, 20.0 + s, rate=100.0) for s in range(2, 6)] + [val_row(3, 9.0)]
    v10 = [train_row(s, 30.0 + s, rate=100.0) for s in range(5, 8)] + [val_row(7, 8.0)]
    path = logged_run(tmp_path, "run", {0: v0, 2: v2, 10: v10}, shape=(1, 100, 1, 1), steps=8, tok_per_s=100.0)
    (path / "csv" / "version_1").mkdir()
    assert [p.parent.name for p in metric_files(path)] == ["version_0", "version_2", "version_10"]
    curve = curve_of(path)
    assert curve.steps == list(range(8))
    assert curve.loss == [10.0, 11.0, 22.0, 23.0, 24.0, 35.0, 36.0, 37.0]
    assert curve.val_steps == [3, 7] and curve.val_loss == [9.0, 8.0]
    assert curve.seconds == pytest.approx([1.0 * (s + 1) for s in range(8)])  # 100 tokens at 100 tok/s per step


def test_equal_time_quantity_by_hand(tmp_path):
    root = tmp_path / "runs"
    # fast: 100 tokens/step at 1000 tok/s, 10 steps -> ends at T = 1.0 s
    fast_losses = [6.0 - 0.2 * s for s in range(10)]
    fast = [train_row(s, x, rate=1000.0) for s, x in enumerate(fast_losses)] + [val_row(9, 4.3)]
    logged_run(root, "fast", {0: fast}, kv=16, shape=(1, 100, 1, 1), steps=10, tok_per_s=1000.0, loss=4.3)
    # slow: 150 tokens/step at 400 tok/s -> 0.375 s a step; T = 1.0 s lies 2/3 of the way from step 1 to step 2
    slow_losses = [5.0, 4.0, 3.5, 3.4, 3.3, 3.2]
    slow = [train_row(s, x, rate=400.0) for s, x in enumerate(slow_losses)] + [val_row(5, 3.25)]
    logged_run(root, "slow", {0: slow}, kv=64, shape=(1, 150, 1, 1), steps=6, tok_per_s=400.0, loss=3.25)
    # another size gets its own T: 2 steps of 50 tokens at 50 tok/s -> T = 2 s
    big = [train_row(0, 7.0, rate=50.0), train_row(1, 6.0, rate=50.0)]
    logged_run(root, "big", {0: big}, size="120m", kv=64, shape=(1, 50, 1, 1), steps=2, tok_per_s=50.0)

    out = tmp_path / "table"
    assert main([str(root), "--out", str(out)]) == 0
    by = {r["run"]: r for r in rows(out)}
    s0 = 5.0
    s1 = (0.8 * 0.2 * 5.0 + 0.2 * 4.0) / (1 - 0.8**2)
    s2 = (0.8**2 * 0.2 * 5.0 + 0.8 * 0.2 * 4.0 + 0.2 * 3.5) / (1 - 0.8**3)
    assert s0 == 5.0 and s1 == pytest.approx(4.4444444)
    assert float(by["slow"]["equal_time_s"]) == pytest.approx(1.0)
    assert float(by["slow"]["train_loss_at_equal_time"]) == pytest.approx(s1 + (2 / 3) * (s2 - s1))
    assert float(by["fast"]["equal_time_s"]) == pytest.approx(1.0)
    assert float(by["fast"]["train_loss_at_equal_time"]) == pytest.approx(ema_by_hand(fast_losses)[-1])
    assert float(by["big"]["equal_time_s"]) == pytest.approx(2.0)
    assert float(by["big"]["train_loss_at_equal_time"]) == pytest.approx((0.2 * 0.8 * 7.0 + 0.2 * 6.0) / 0.36)

    # speed columns: steady tok/s and MFU as results.json has them, train time = tokens / tok/s
    assert float(by["slow"]["tok_per_s"]) == 400.0 and float(by["slow"]["mfu"]) == 0.25
    assert float(by["slow"]["train_time_s"]) == pytest.approx(6 * 150 / 400)
    md = md_rows(out)
    header, slow_row = md["header"], md["tiny/mla-kv64"]
    assert slow_row[header.index("tok/s")] == "400" and slow_row[header.index("MFU")] == "25.00%"
    assert slow_row[header.index("train time")] == "2.25 s"
    assert slow_row[header.index("train loss @ T")] == f"{s1 + (2 / 3) * (s2 - s1):.4f}"
    text = (out / "table.md").read_text()
    assert "train loss @ T (quality at equal training time)" in text and "T = 1 s (tiny), 2 s (120m)" in text
    for png in ("loss_curves.png", "loss_vs_time.png"):
        assert (out / png).read_bytes()[:8] == PNG, png


def test_seed_groups_and_spread(tmp_path):
    root = tmp_path / "runs"
    logged_run(root, "mla-seed1", None, seed=1, loss=3.10)
    logged_run(root, "mla-seed2", None, seed=2, loss=3.13, resume="last")  # resumed: still the same training
    logged_run(root, "mla-seed3", None, seed=3, loss=None)  # not validated: listed, left out of mean and spread
    logged_run(root, "other-lr-seed2", None, seed=2, lr=2e-3, loss=3.00)  # differs in optim.lr: no group
    logged_run(root, "kv16-seed1", None, kv=16, seed=1, loss=3.3)  # alone with its config
    runs = collect([root])
    groups = seed_groups(runs)
    assert [sorted(r.row["run"] for r in g) for g in groups] == [["mla-seed1", "mla-seed2", "mla-seed3"]]
    grouped = sorted(groups[0], key=lambda r: r.row["run"])
    assert labels(grouped) == ["mla-kv64 seed 1", "mla-kv64 seed 2", "mla-kv64 seed 3"]

    out = tmp_path / "table"
    assert main([str(root), "--out", str(out)]) == 0
    assert {r["run"]: r["seed"] for r in rows(out)} == {
        "mla-seed1": "1",
        "mla-seed2": "2",
        "mla-seed3": "3",
        "other-lr-seed2": "2",
        "kv16-seed1": "1",
    }
    text = (out / "table.md").read_text()
    assert "## Seed spread" in text
    assert "| tiny | mla-kv64 | 1: 3.1000, 2: 3.1300, 3: — | 3.1150 | 0.0300 |" in text
    section = text.split("## Seed spread")[1]
    assert section.count("| tiny | mla-kv") == 1  # one group only


def test_no_seed_group_when_another_key_differs(tmp_path):
    root = tmp_path / "runs"
    logged_run(root, "a", None, seed=1)
    logged_run(root, "b", None, seed=2, lr=3e-4)
    assert seed_groups(collect([root])) == []
    out = tmp_path / "table"
    assert main([str(root), "--out", str(out)]) == 0
    assert "No runs differ only in seed" in (out / "table.md").read_text()


def test_an_option_added_later_and_left_null_keeps_runs_in_one_seed_group(tmp_path):
    root = tmp_path / "runs"
    for name, seed, added in (
        ("old", 1, {}),
        ("new", 2, {"profile_steps": None}),
        ("profiled", 3, {"profile_steps": [3, 4]}),
    ):
        path = logged_run(root, name, None, seed=seed)
        data = json.loads((path / "results.json").read_text())
        data["config"]["train"] = {"max_steps": 10} | added
        (path / "results.json").write_text(json.dumps(data))
    assert [sorted(r.row["run"] for r in g) for g in seed_groups(collect([root]))] == [["new", "old"]]


def test_runs_without_logs_still_table(tmp_path):
    root = tmp_path / "runs"
    log = [train_row(s, 5.0 - 0.1 * s, rate=1000.0) for s in range(5)] + [val_row(4, 4.7)]
    logged_run(root, "logged", {0: log}, kv=64, shape=(1, 100, 1, 1), steps=5)
    logged_run(root, "bare", None, kv=16, shape=(1, 100, 1, 1), steps=5, tok_per_s=250.0)
    untimed = [train_row(s, 5.0 - 0.1 * s) for s in range(5)]  # logs, but no throughput anywhere
    logged_run(root, "untimed", {0: untimed}, kv=32, shape=(1, 100, 1, 1), steps=5, tok_per_s=None)
    out = tmp_path / "table"
    assert main([str(root), "--out", str(out)]) == 0
    by = {r["run"]: r for r in rows(out)}
    assert set(by) == {"logged", "bare", "untimed"}
    assert by["untimed"]["train_time_s"] == "" and by["untimed"]["train_loss_at_equal_time"] == ""
    assert by["bare"]["train_loss_at_equal_time"] == "" and by["bare"]["equal_time_s"] == ""
    assert float(by["bare"]["train_time_s"]) == pytest.approx(500 / 250)  # from results.json alone
    assert by["logged"]["train_loss_at_equal_time"] != ""
    text = (out / "table.md").read_text()
    assert (
        "Without curves (no csv/version_*/metrics.csv: trained with logger=wandb, or the logs were not copied)" in text
    )
    assert text.count(": bare.") == 1
    assert "No throughput known, left out of loss_vs_time.png: untimed." in text
    for png in ("loss_curves.png", "loss_vs_time.png"):
        assert (out / png).read_bytes()[:8] == PNG
        height, width, _ = matplotlib.image.imread(out / png).shape  # decodes
        assert width > height > 100

    # no run with logs: no curves, a note instead
    only = tmp_path / "only"
    logged_run(only, "bare", None)
    assert main([str(only), "--out", str(tmp_path / "t2")]) == 0
    assert not (tmp_path / "t2" / "loss_curves.png").exists()
    assert "No run has metric logs" in (tmp_path / "t2" / "table.md").read_text()
