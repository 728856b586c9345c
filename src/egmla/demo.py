"""`make demo` / `python -m egmla.demo`: train the tiny model once per attention variant on the embedded corpus
(CPU, a few minutes in all) and print validation loss beside KV-cache bytes.

Each variant is its own `egmla-train experiment=demo_tiny attention=...` process, under a fresh timestamped
folder, so re-running never touches earlier runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

VARIANTS = ("mha", "gqa", "mqa", "mla", "egmla")


def run_variant(variant: str, root: Path, extra: list[str]) -> dict:
    run_dir = root / variant
    cmd = [
        sys.executable,
        "-m",
        "egmla.train",
        "experiment=demo_tiny",
        f"attention={variant}",
        f"run_dir={run_dir}",
        *extra,
    ]
    print(f"\n=== {variant}: {' '.join(cmd[2:])}", flush=True)
    start = time.perf_counter()
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"demo: training {variant} failed (see the output above)")
    results = json.loads((run_dir / "results.json").read_text())
    results["wall_s"] = time.perf_counter() - start
    return results


def table(rows: list[dict]) -> str:
    # f-strings rather than pandas/tabulate: one format per column, and tabulate is not an egmla dependency
    mha = next((r for r in rows if r["config"]["attention"]["variant"] == "mha"), None)
    lines = [
        f"{'variant':<22} {'val loss':>8} {'val bpb':>8} {'KV B/token':>10} {'vs MHA':>7} {'params':>8} "
        f"{'gate tables':>11} {'tok/s':>7} {'wall s':>6}"
    ]
    for r in rows:
        kv = r["kv"]["bytes_per_token"]
        saving = f"{100 * (1 - kv / mha['kv']['bytes_per_token']):.0f}%" if mha else "-"
        val = r["val"] or {}
        lines.append(
            f"{r['config']['attention']['name']:<22} {val.get('loss', float('nan')):>8.4f} "
            f"{val.get('bpb') or float('nan'):>8.4f} {kv:>10,} {saving:>7} "
            f"{r['params']['non_embedding'] / 1e6:>7.2f}M {r['params']['gate_tables'] / 1e6:>10.2f}M "
            f"{r['train']['tok_per_s'] or 0:>7,.0f} {r['wall_s']:>6.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m egmla.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--root", type=Path, default=None, help="where runs go (default runs/demo_tiny/<time>)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, e.g. train.max_steps=50")
    args = parser.parse_args(argv)
    root = args.root or Path("runs/demo_tiny") / datetime.now().strftime("%Y%m%d-%H%M%S")
    start = time.perf_counter()
    rows = [run_variant(v, root, args.overrides) for v in args.variants]
    print(
        f"\nDemo: tiny model ({rows[0]['train']['steps']} steps, {rows[0]['train']['tokens']:,} tokens each), "
        f"embedded corpus, CPU; runs under {root}\n"
    )
    print(table(rows))
    print(f"\nTotal wall time: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
