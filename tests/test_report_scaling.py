"""egmla-table's scaling section and figures: loss per (variant, size), seeds averaged, the margin between two
variants at each size, training compute = flops_per_token x tokens; nothing of it for runs of one size."""

from __future__ import annotations

import json
from pathlib import Path

from egmla.report import collect, main
from egmla.report_scaling import FLOPS_PNG, PARAMS_PNG, scaling_points
from test_report import write_run

# size -> (non-embedding params, flops per token, tokens)
SIZES = {"tiny": (3_000_000, 2.0e7, 1_000_000), "120m": (85_000_000, 1.1e9, 2_000_000)}


def scaled_run(root: Path, name: str, size: str, variant: str, loss: float) -> Path:
    kv, gate = (64, None) if variant == "mla" else (16, 32)
    path = write_run(root, name, size, variant, kv=kv, gate=gate, loss=loss)
    params, per_token, tokens = SIZES[size]
    results = json.loads((path / "results.json").read_text())
    results["params"]["non_embedding"] = params
    results["flops_per_token"] = per_token
    results["train"]["tokens"] = tokens
    (path / "results.json").write_text(json.dumps(results))
    return path


def scaling_runs(root: Path) -> Path:
    scaled_run(root, "tiny-mla", "tiny", "mla", 4.0)
    scaled_run(root, "tiny-egmla-s1", "tiny", "egmla", 3.7)
    scaled_run(root, "tiny-egmla-s2", "tiny", "egmla", 3.9)  # a second seed: averaged with the first
    scaled_run(root, "120m-mla", "120m", "mla", 3.0)
    scaled_run(root, "120m-egmla", "120m", "egmla", 2.95)
    return root


def test_points_average_seeds_and_compute_training_flops(tmp_path):
    points = {(p.variant, p.size): p for p in scaling_points(collect([scaling_runs(tmp_path / "runs")]))}
    assert set(points) == {(v, s) for v in ("mla-kv64", "egmla-kv16-g32") for s in ("tiny", "120m")}
    tiny = points[("egmla-kv16-g32", "tiny")]
    assert tiny.runs == 2 and abs(tiny.val_loss - 3.8) < 1e-12
    assert tiny.params == 3_000_000 and tiny.flops == 2.0e7 * 1_000_000
    assert points[("mla-kv64", "120m")].flops == 1.1e9 * 2_000_000
    assert points[("mla-kv64", "120m")].kv_bytes == 2 * 12 * (64 + 64)  # 12 layers x (latent + rope), bf16


def test_table_gets_the_margin_per_size_and_both_figures(tmp_path):
    out = tmp_path / "out"
    assert main([str(scaling_runs(tmp_path / "runs")), "--out", str(out)]) == 0
    text = (out / "table.md").read_text()
    section = text.split("## Scaling")[1]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    # the larger KV (MLA) first; margin = EG-MLA - MLA, negative where EG-MLA is better
    assert lines[0] == "| size | non-emb params | mla-kv64 | egmla-kv16-g32 | egmla-kv16-g32 - mla-kv64 |"
    assert lines[1] == "| tiny | 3.0M | 4.0000 | 3.8000 | -0.2000 |"
    assert lines[2] == "| 120m | 85.0M | 3.0000 | 2.9500 | -0.0500 |"
    assert "1 point(s) average several runs" in section
    for png in (PARAMS_PNG, FLOPS_PNG):
        assert (out / png).stat().st_size > 10_000 and f"({png})" in section


def test_runs_of_one_size_get_no_scaling_section(tmp_path):
    root = tmp_path / "runs"
    scaled_run(root, "a", "120m", "mla", 3.0)
    scaled_run(root, "b", "120m", "egmla", 2.9)
    out = tmp_path / "out"
    assert main([str(root), "--out", str(out)]) == 0
    assert "## Scaling" not in (out / "table.md").read_text()
    assert not (out / PARAMS_PNG).exists() and not (out / FLOPS_PNG).exists()
