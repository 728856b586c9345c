"""What EG-MLA's gate tables cost to train: MLA, EG-MLA and EG-MLA with its gate tables frozen (no gradient, no
optimizer update), one process, through egmla-bench train's measurement. The frozen row bounds what any sparse or
fused handling of the tables' gradients and updates could save (such handling still needs the rows' gradient).
A measurement, not a training setting: frozen tables never learn.

    python experiments/throughput/frozen_tables.py                       # 120m, seq 2048, batch 16, one GPU
    python experiments/throughput/frozen_tables.py --size tiny --seq 32  # CPU smoke run

Results: experiments/throughput/README.md, "Where EG-MLA's gap to MLA sits".
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch

from egmla.bench import train as bench


def frozen_gate_tables(build):
    """A model builder like `build` whose models' gate tables do not train."""

    def build_frozen(cfg):
        model = build(cfg)
        model.gate_tables.requires_grad_(False)
        return model

    return build_frozen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="120m")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compile_scope = "model" if device.type == "cuda" else None
    overrides = [f"model.max_seq_len={args.seq}"]
    rows = []
    for variant, frozen in (("mla", False), ("egmla", False), ("egmla", True)):
        build = frozen_gate_tables(bench.build_model) if frozen else bench.build_model
        with mock.patch.object(bench, "build_model", build):
            row = bench.bench_variant(
                args.size, variant, args.seq, args.batch, args.steps, args.warmup, compile_scope, overrides, device
            )
        row["variant"] += "-frozen-tables" if frozen else ""
        rows.append(row)
    print(bench.format_table(rows))


if __name__ == "__main__":
    main()
