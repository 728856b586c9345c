"""The two tables of a study README (experiments/table1_small, experiments/gate_dim_small), printed as Markdown from
what egmla-table and the runs wrote: one row per run from results.csv, and validation loss at each validation from
the runs' metric logs (read as egmla-table reads them). The READMEs paste this output; nothing in them is typed
from a screen.

    python experiments/readme_tables.py experiments/table1_small
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from egmla.report import load_results
from egmla.report_curves import read_curve

ROW_NAMES = {  # attention name (conf/attention, as results.csv has it) -> the row's name in the READMEs
    "mha": "MHA",
    "mla-kv256": "MLA-Base (kv256)",
    "mla-kv64": "MLA kv64 (no gate)",
    "egmla-kv64-g256": "EG-MLA kv64",
    "egmla-kv16-g256": "EG-MLA kv16",
    "egmla-kv256-g256": "EG-MLA kv256",
    "egmla-kv64-g256-lat": "EG-MLA kv64, gate on the latent",
    "egmla-kv64-g256-add": "additive control kv64",
}


def row_name(row: dict, gate_widths: set[str]) -> str:
    name = ROW_NAMES.get(row["attention"], row["attention"])
    if row["variant"] == "egmla" and len(gate_widths) > 1:  # a study of the gate's width names it on every row
        name = f"EG-MLA kv{row['kv_lora_rank']}, gate_dim {row['gate_dim']}"
    return f"{name}, seed {row['seed']}"


def validation_losses(run_dir: Path) -> dict[float, float]:
    """Validation loss by training tokens seen, as egmla-table's curves read it from the run's logs."""
    curve = read_curve(run_dir, load_results(run_dir / "results.json") or {})
    return dict(zip(curve.val_tokens, curve.val_loss, strict=True))


def main(folder: Path) -> None:
    with open(folder / "results.csv") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["run_dir"])
    equal_time = rows[0]["equal_time_s"]
    gate_widths = {r["gate_dim"] for r in rows if r["variant"] == "egmla"}
    print(
        "| trial | row | KV B/token | val loss | val bpb | tok/s "
        f"| train loss at equal time ({float(equal_time):.1f} s) | avg acc (7 tasks) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['run_dir'].rsplit('-', 1)[-1]} | {row_name(r, gate_widths)} | {int(r['kv_bytes_per_token']):,} | "
            f"{float(r['val_loss']):.4f} | {float(r['val_bpb']):.4f} | {float(r['tok_per_s']):,.0f} | "
            f"{float(r['train_loss_at_equal_time']):.4f} | {100 * float(r['avg_acc']):.2f} |"
        )
    curves = {row_name(r, gate_widths): validation_losses(Path(r["run_dir"])) for r in rows}
    tokens = sorted({t for curve in curves.values() for t in curve})
    print("\n| row | " + " | ".join(f"{t / 1e6:.1f}M" for t in tokens) + " |")
    print("|---|" + "---:|" * len(tokens))
    for name, curve in curves.items():
        print(f"| {name} | " + " | ".join(f"{curve[t]:.3f}" if t in curve else "" for t in tokens) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
