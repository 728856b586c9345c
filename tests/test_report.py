"""egmla-table: the accuracy-vs-KV table from hand-made results.json files (savings, missing values, Pareto
front, sorting, every output file)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from egmla.report import collect, main, pareto_front

MODELS = {
    "tiny": dict(
        n_layers=4,
        d_model=128,
        n_heads=4,
        ffn_hidden=384,
        max_seq_len=256,
        attention_defaults=dict(
            head_dim=32, rope_head_dim=16, mla_kv_lora_rank=64, egmla_kv_lora_rank=16, gate_dim=32, n_kv_heads=2
        ),
    ),
    "120m": dict(
        n_layers=12,
        d_model=768,
        n_heads=12,
        ffn_hidden=2048,
        max_seq_len=2048,
        attention_defaults=dict(
            head_dim=64, rope_head_dim=64, mla_kv_lora_rank=256, egmla_kv_lora_rank=64, gate_dim=256, n_kv_heads=4
        ),
    ),
}


def attention(size: str, variant: str, kv: int | None = None, gate: int | None = None) -> dict:
    d = MODELS[size]["attention_defaults"]
    if variant in ("mha", "gqa", "mqa"):
        return {"name": variant, "variant": variant, "head_dim": None}
    a = {
        "variant": variant,
        "kv_lora_rank": kv,
        "qk_nope_head_dim": d["head_dim"],
        "qk_rope_head_dim": d["rope_head_dim"],
        "v_head_dim": d["head_dim"],
        "q_lora_rank": None,
    }
    if variant == "mla":
        return a | {"name": f"mla-kv{kv}"}
    return a | {"name": f"egmla-kv{kv}-g{gate}", "gate_dim": gate, "gate_enabled": True}


def kv_elements(size: str, variant: str, kv: int | None) -> int:
    m = MODELS[size]
    if variant == "mha":
        return 2 * m["n_layers"] * m["d_model"]
    return m["n_layers"] * (kv + m["attention_defaults"]["rope_head_dim"])


def write_run(
    root: Path,
    name: str,
    size: str,
    variant: str,
    kv: int | None = None,
    gate: int | None = None,
    loss: float | None = 3.0,
    accs: dict | None = None,
    avg: float | None = None,
) -> Path:
    """A results.json as egmla-train (and egmla-eval, when `accs`) write it."""
    model = {
        "name": size,
        "vocab_size": 50257,
        "rope_theta": 10000.0,
        "norm_eps": 1e-6,
        "tie_embeddings": True,
        "init_std": 0.02,
        **MODELS[size],
    }
    elements = kv_elements(size, variant, kv)
    gate_tables = MODELS[size]["n_layers"] * 50257 * gate if gate else 0
    results = {
        "run_name": name,
        "experiment_name": "test",
        "run_dir": str(root / name),
        "config": {"model": model, "attention": attention(size, variant, kv, gate)},
        "git": {"commit": "0123456789abcdef0123", "dirty": False},
        "machine": {"host": "gpu-node-1", "cpus": 64, "gpus": ["NVIDIA H100 80GB HBM3"] * 8},
        "date": "2026-11-20T10:00:00+00:00",
        "params": {
            "non_embedding": 85_000_000,
            "embedding": 38_597_376,
            "gate_tables": gate_tables,
            "total": 123_597_376 + gate_tables,
        },
        "kv": {
            "elements_per_layer": elements // MODELS[size]["n_layers"],
            "elements_per_token": elements,
            "bytes_per_token": 2 * elements,
            "dtype": "bf16",
            "id_bytes_per_token": 4 if gate else 0,
        },
        "flops_per_token": 1,
        "train": {"steps": 100, "tokens": 50_000_000_000, "tok_per_s": 1e5, "mfu": 0.4, "devices": 8},
        "val": {"loss": loss, "bpb": None if loss is None else loss / 2.5, "tokens": 1000},
    }
    if accs is not None:
        results["eval"] = {task: {"acc": a, "acc_norm": a + 0.01, "acc_stderr": 0.01} for task, a in accs.items()}
        results["eval"]["lambada_openai"] = {"acc": 0.3, "perplexity": 40.5}
        results["avg_acc"] = avg
        results["eval_config"] = {
            "tasks": [*accs, "lambada_openai"],
            "limit": None,
            "metrics": {"hellaswag": "acc_norm", "lambada_openai": "perplexity"},
        }
    path = root / name
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(results))
    return path


@pytest.fixture
def runs(tmp_path):
    """A Table-1-like set: 120M MHA / MLA / EG-MLA kv64 / kv16 (kv16 not evaluated), plus a tiny MHA run."""
    root = tmp_path / "runs"

    def accs(a: float) -> dict:
        return {"piqa": a, "hellaswag": a - 0.1}

    write_run(root / "sweep", "egmla64", "120m", "egmla", 64, 256, loss=3.10, accs=accs(0.60), avg=0.4433)
    write_run(root / "sweep", "mha", "120m", "mha", loss=3.00, accs=accs(0.62), avg=0.4500)
    write_run(root / "sweep", "mla", "120m", "mla", 256, loss=3.12, accs=accs(0.58), avg=0.4384)
    write_run(root / "sweep" / "nested", "egmla16", "120m", "egmla", 16, 256, loss=None)
    write_run(root / "other", "tiny-mha", "tiny", "mha", loss=4.5)
    return root


def rows(out: Path) -> list[dict]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def md_rows(out: Path) -> dict[str, list[str]]:
    """Markdown table rows by attention name (second column)."""
    lines = [ln for ln in (out / "table.md").read_text().splitlines() if ln.startswith("| ") and "---" not in ln]
    header, *body = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return {"header": header} | {f"{r[0]}/{r[1]}": r for r in body}


def test_table_files_savings_and_order(runs, tmp_path, capsys):
    out = tmp_path / "table"
    assert main([str(runs / "sweep"), str(runs / "other" / "tiny-mha"), "--out", str(out), "--title", "T1"]) == 0
    for name in ("table.md", "results.csv", "table.tex", "acc_vs_kv.png", "loss_vs_kv.png"):
        assert (out / name).stat().st_size > 0, name
    for png in ("acc_vs_kv.png", "loss_vs_kv.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = rows(out)
    # sorted by model size, then KV bytes: tiny first; at 120M kv16 < kv64 < MLA < MHA
    assert [r["run"] for r in table] == ["tiny-mha", "egmla16", "egmla64", "mla", "mha"]
    by = {r["run"]: r for r in table}
    assert float(by["egmla64"]["saving_vs_mha"]) == pytest.approx(1 - 1536 / 18432)  # 91.67%
    assert float(by["egmla64"]["saving_vs_mla"]) == pytest.approx(1 - 1536 / 3840)  # 60.0%
    assert float(by["egmla16"]["saving_vs_mla"]) == pytest.approx(1 - 960 / 3840)
    assert float(by["mla"]["saving_vs_mla"]) == 0.0 and float(by["mha"]["saving_vs_mha"]) == 0.0
    # the tiny run's references are its own size's: MHA 2 x 4 x 128, MLA 4 x (64 + 16)
    assert float(by["tiny-mha"]["saving_vs_mla"]) == pytest.approx(1 - 1024 / 320)
    assert by["egmla64"]["kv_lora_rank"] == "64" and by["egmla64"]["gate_dim"] == "256"
    assert by["mla"]["kv_lora_rank"] == "256" and by["mla"]["gate_dim"] == ""
    # a per-task accuracy choice of an older results.json (hellaswag: acc_norm) gives way to the headline (acc);
    # a non-accuracy one (lambada_openai: perplexity) still names the column
    assert float(by["egmla64"]["hellaswag/acc"]) == pytest.approx(0.50) and "hellaswag/acc_norm" not in by["egmla64"]
    assert by["egmla64"]["lambada_openai/perplexity"] == "40.5"

    md = md_rows(out)
    assert md["120m/egmla-kv64-g256"][8:10] == ["91.67%", "60.00%"]
    assert md["120m/egmla-kv64-g256"][md["header"].index("hellaswag")] == "50.00"  # percent
    assert md["120m/egmla-kv64-g256"][md["header"].index("avg acc")] == "44.33"
    text = (out / "table.md").read_text()
    assert text.startswith("# T1")
    assert "egmla-table" in text and "--title T1" in text  # the exact command
    assert "8 x NVIDIA H100 80GB HBM3" in text and "0123456789ab" in text and "2026-11-20" in text
    assert "acc_vs_kv.png" in capsys.readouterr().out


def test_missing_values_stay_missing(runs, tmp_path):
    out = tmp_path / "table"
    assert main([str(runs), "--out", str(out)]) == 0
    by = {r["run"]: r for r in rows(out)}
    kv16, tiny = by["egmla16"], by["tiny-mha"]
    for key in ("val_loss", "val_bpb", "piqa/acc", "avg_acc", "pareto_acc_vs_kv"):
        assert kv16[key] == "", key  # empty, never 0
    assert tiny["saving_vs_mha"] == "0.0" and tiny["val_loss"] == "4.5"
    md = md_rows(out)
    row = md["120m/egmla-kv16-g256"]
    header = md["header"]
    for column in ("val loss", "val bpb", "piqa", "avg acc"):
        assert row[header.index(column)] == "—", column
    assert "0.00" not in row[header.index("val loss") :]
    tex = (out / "table.tex").read_text()
    kv16_line = next(ln for ln in tex.splitlines() if ln.startswith("120m & egmla-kv16"))
    assert kv16_line.count("---") >= 4 and "egmla-kv16-g256" in kv16_line
    assert "\\toprule" in tex and "d\\_c" in tex and "91.67\\%" in tex


def test_without_accuracies_the_accuracy_plot_is_skipped_with_a_note(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "mha", "120m", "mha")
    write_run(root, "egmla", "120m", "egmla", 64, 256)
    out = tmp_path / "table"
    assert main([str(root), "--out", str(out)]) == 0
    assert not (out / "acc_vs_kv.png").exists() and (out / "loss_vs_kv.png").is_file()
    text = (out / "table.md").read_text()
    assert "No run has accuracies" in text
    assert "Pareto" not in md_rows(out)["header"]


def test_pareto_front_small_example():
    # (KV bytes, accuracy): lower KV and higher accuracy are better
    points = [(1, 0.50), (2, 0.60), (2, 0.55), (3, 0.60), (4, 0.70), (4, 0.70), (None, 0.90), (5, None), (6, 0.65)]
    assert pareto_front(points) == [True, True, False, False, True, True, False, False, False]
    # loss: lower is better on both axes
    assert pareto_front([(1, 3.0), (2, 2.5), (3, 2.7), (4, 2.0)], maximize=False) == [True, True, False, True]
    assert pareto_front([]) == []


def test_pareto_column_marks_the_front(runs, tmp_path):
    out = tmp_path / "table"
    assert main([str(runs / "sweep"), "--out", str(out)]) == 0
    front = {r["run"]: r["pareto_acc_vs_kv"] for r in rows(out)}
    # kv64 (3,072 B, 44.33) and MHA (36,864 B, 45.00) are on it; MLA (7,680 B, 43.84) is dominated by kv64
    assert front == {"egmla16": "", "egmla64": "True", "mla": "False", "mha": "True"}


def test_collect_finds_nested_runs_once(runs):
    found = collect([runs, runs / "sweep", runs / "sweep" / "mha"])
    assert sorted(r.row["run"] for r in found) == ["egmla16", "egmla64", "mha", "mla", "tiny-mha"]


def test_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("egmla-table: error:") for line in err)
    assert not (tmp_path / "o").exists()


def with_eval(run_dir: Path, scores: dict, config: dict, **keys) -> None:
    """Put an evaluation into a run's results.json: per-task scores, eval_config and the other keys given."""
    path = run_dir / "results.json"
    results = json.loads(path.read_text())
    results |= {"eval": scores, "eval_config": {"limit": None, "metrics": {}, **config}, **keys}
    path.write_text(json.dumps(results))


def suite(piqa: float, piqa_norm: float, wino: float) -> dict:
    return {"piqa": {"acc": piqa, "acc_norm": piqa_norm, "acc_stderr": 0.01}, "winogrande": {"acc": wino}}


@pytest.fixture
def normed_runs(tmp_path):
    """Three 120M runs scored on piqa (acc, acc_norm) and winogrande (acc only), eval.metric=acc_norm. By acc MLA
    is dominated by EG-MLA kv64 (less KV, higher acc); by acc_norm it is on the front."""
    root = tmp_path / "runs"
    config = {"tasks": ["piqa", "winogrande"], "average": ["piqa", "winogrande"], "metric": "acc_norm"}
    splits = {"piqa": "validation", "winogrande": "validation"}  # lm-eval's stock splits: no note
    for name, variant, kv, scores in (
        ("egmla64", "egmla", 64, suite(0.50, 0.40, 0.40)),
        ("mla", "mla", 256, suite(0.48, 0.52, 0.40)),
        ("mha", "mha", None, suite(0.55, 0.55, 0.45)),
    ):
        run = write_run(root, name, "120m", variant, kv, 256 if variant == "egmla" else None)
        avg = (scores["piqa"]["acc"] + scores["winogrande"]["acc"]) / 2
        avg_norm = (scores["piqa"]["acc_norm"] + scores["winogrande"]["acc"]) / 2
        with_eval(run, scores, config, avg_acc=avg, avg_acc_norm=avg_norm, eval_splits=splits)
    return root


def test_headline_acc_norm_leads_the_table_the_plot_and_the_front(normed_runs, tmp_path):
    out = tmp_path / "table"
    assert main([str(normed_runs), "--out", str(out)]) == 0
    md, by = md_rows(out), {r["run"]: r for r in rows(out)}
    header = md["header"]
    assert header.index("avg acc_norm") < header.index("avg acc") and "piqa (acc_norm)" in header
    assert "winogrande" in header and "winogrande (acc_norm)" not in header  # winogrande defines acc only
    mla = md["120m/mla-kv256"]
    assert mla[header.index("piqa (acc_norm)")] == "52.00" and mla[header.index("avg acc_norm")] == "46.00"
    assert mla[header.index("avg acc")] == "44.00"
    assert {r: by[r]["pareto_acc_vs_kv"] for r in by} == {"egmla64": "True", "mla": "True", "mha": "True"}
    assert {r["headline"] for r in by.values()} == {"avg_acc_norm"} and float(by["mla"]["piqa/acc_norm"]) == 0.52
    text = (out / "table.md").read_text()
    assert "headline acc_norm" in text and "Split:" not in text and "different eval.metric" not in text

    out = tmp_path / "by_acc"
    assert main([str(normed_runs), "--out", str(out), "--metric", "acc"]) == 0
    header, by = md_rows(out)["header"], {r["run"]: r for r in rows(out)}
    assert header.index("avg acc") < header.index("avg acc_norm") and "piqa" in header
    assert {r: by[r]["pareto_acc_vs_kv"] for r in by} == {"egmla64": "True", "mla": "False", "mha": "True"}


OFFLINE_7 = [
    "piqa_offline",
    "arc_easy_offline",
    "arc_challenge_offline",
    "hellaswag_offline",
    "winogrande_offline",
    "social_iqa_offline",
    "mmlu_offline",
]


def test_older_offline_results_table_with_both_averages_and_name_the_arc_split(normed_runs, tmp_path):
    """A results.json as egmla-eval wrote it before avg_acc_norm and eval_splits (experiments/tiny's runs): per-task
    acc chosen in eval_config.metrics, ARC scored on validation (the only offline copy then)."""
    accs = dict(zip(OFFLINE_7, (0.51, 0.31, 0.27, 0.21, 0.49, 0.29, 0.2321), strict=True))
    normed = {"piqa_offline": 0.53, "arc_easy_offline": 0.30, "arc_challenge_offline": 0.25, "hellaswag_offline": 0.26}
    scores = {t: {"acc": a} | ({"acc_norm": normed[t]} if t in normed else {}) for t, a in accs.items()}
    scores["lambada_openai_offline"] = {"acc": 0.0, "perplexity": 1e6}
    config = {
        "name": "offline",
        "tasks": [*OFFLINE_7, "lambada_openai_offline"],
        "average": OFFLINE_7,
        "limit": 100,
        "metrics": {t: "acc" for t in [*OFFLINE_7, "lambada_openai_offline"]},
    }
    old = write_run(normed_runs, "old-tiny", "tiny", "egmla", 16, 32)
    with_eval(old, scores, config, avg_acc=0.3303)
    out = tmp_path / "table"
    assert main([str(normed_runs / "old-tiny"), "--out", str(out)]) == 0
    [row] = rows(out)
    assert float(row["avg_acc"]) == pytest.approx(sum(accs.values()) / 7) == pytest.approx(0.3303, abs=1e-4)
    expected_norm = (0.53 + 0.30 + 0.25 + 0.26 + 0.49 + 0.29 + 0.2321) / 7
    assert float(row["avg_acc_norm"]) == pytest.approx(expected_norm) and row["headline"] == "avg_acc"
    text = (out / "table.md").read_text()
    assert "Split: arc_easy scored on its validation split (570), not the stock test split (2,376), in 1 of 1" in text
    assert "Split: arc_challenge scored on its validation split (299), not the stock test split (1,172)" in text

    out = tmp_path / "mixed"  # with the acc_norm runs, which recorded their (stock) splits
    assert main([str(normed_runs), "--out", str(out)]) == 0
    text = (out / "table.md").read_text()
    assert "The runs chose different eval.metric (acc x1, acc_norm x3): tabled with acc_norm" in text
    assert "not the stock test split (2,376), in 1 of 4 evaluated runs" in text


# --- the accuracy plot: error bars, the subset caveat, a legend of drawn artists only ---------------------------


def stderr_runs(tmp_path) -> Path:
    """Three 120M runs on two tasks scored with eval.limit=200; the stderrs are chosen so the average's standard
    error is exact by hand: sqrt(0.03^2 + 0.04^2) / 2 = 0.025 and sqrt(0.05^2 + 0.12^2) / 2 = 0.065."""
    root = tmp_path / "runs"
    config = {"tasks": ["piqa", "winogrande"], "average": ["piqa", "winogrande"], "metric": "acc", "limit": 200}
    for name, variant, kv, (piqa, wino) in (
        ("egmla64", "egmla", 64, ((0.50, 0.03), (0.40, 0.04))),
        ("mla", "mla", 256, ((0.60, 0.05), (0.30, 0.12))),
        ("mha", "mha", None, ((0.55, 0.03), (0.45, None))),
    ):
        run = write_run(root, name, "120m", variant, kv, 256 if variant == "egmla" else None)
        scores = {"piqa": {"acc": piqa[0], "acc_stderr": piqa[1]}, "winogrande": {"acc": wino[0]}}
        if wino[1] is not None:
            scores["winogrande"]["acc_stderr"] = wino[1]
        with_eval(run, scores, config, avg_acc=(piqa[0] + wino[0]) / 2)
    return root


def drawn(handle) -> bool:
    """Whether a legend handle's artist shows something: points with offsets, or a line of two or more points."""
    if hasattr(handle, "get_offsets"):
        return len(handle.get_offsets()) > 0
    return len(handle.get_xdata()) >= 2


def test_accuracy_plot_has_standard_error_bars_the_subset_caveat_and_only_drawn_legend_entries(tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    from egmla.report import accuracy_caveat, accuracy_points, collect, figure_vs_kv, pareto_front

    runs = collect([stderr_runs(tmp_path)])
    by = {r.row["run"]: i for i, r in enumerate(runs)}
    values, errors = accuracy_points(runs)
    assert values[by["egmla64"]] == pytest.approx(45.0) and values[by["mla"]] == pytest.approx(45.0)
    assert errors[by["egmla64"]] == pytest.approx(2.5) and errors[by["mla"]] == pytest.approx(6.5)
    assert errors[by["mha"]] is None  # winogrande's stderr is missing: no bar, never a 0 one

    note = accuracy_caveat(runs, errors)
    front = pareto_front([(r.row["kv_bytes_per_token"], v) for r, v in zip(runs, values, strict=True)])
    fig = figure_vs_kv(runs, values, front, "acc", "t", errors, note)
    ax = fig.axes[0]
    assert "eval.limit=200 examples per task" in fig.texts[0].get_text() and "not the full splits" in note
    bars = sorted(
        [float(x) for point in seg for x in point]
        for c in ax.collections
        if isinstance(c, LineCollection)
        for seg in c.get_segments()
    )
    kv = {r.row["run"]: r.row["kv_bytes_per_token"] for r in runs}  # each bar: (kv, value - se) to (kv, value + se)
    expected = sorted([[kv["egmla64"], 42.5, kv["egmla64"], 47.5], [kv["mla"], 38.5, kv["mla"], 51.5]])
    assert len(bars) == 2 and all(b == pytest.approx(e) for b, e in zip(bars, expected, strict=True))
    handles, labels = ax.get_legend_handles_labels()
    assert sorted(labels) == ["Pareto front", "model 120m"] and all(drawn(h) for h in handles)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == labels
    plt.close(fig)

    # the loss plot's front is one point here (egmla64: least KV and least loss): its legend entry is still drawn
    losses = [1.0 if r.row["run"] == "egmla64" else 2.0 for r in runs]
    loss_front = pareto_front([(r.row["kv_bytes_per_token"], v) for r, v in zip(runs, losses, strict=True)], False)
    fig = figure_vs_kv(runs, losses, loss_front, "loss", "t")
    handles, labels = fig.axes[0].get_legend_handles_labels()
    assert "Pareto front" in labels and all(drawn(h) for h in handles) and not fig.texts
    plt.close(fig)


def test_full_split_caveat_and_the_note_in_table_md(normed_runs, tmp_path):
    from egmla.report import accuracy_caveat, accuracy_points, collect

    runs = collect([normed_runs])
    _, errors = accuracy_points(runs)
    assert all(e is None for e in errors)  # winogrande has no stderr in these files
    caveat = "Accuracies from full task splits; no standard errors in results.json: no error bars."
    assert accuracy_caveat(runs, errors) == caveat
    out = tmp_path / "table"
    assert main([str(normed_runs), "--out", str(out)]) == 0
    assert accuracy_caveat(runs, errors) in (out / "table.md").read_text()
