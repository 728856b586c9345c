"""`egmla-kv`: the KV-cache / parameter / FLOP table of model selections, without training.

egmla-kv model=120m attention=egmla attention.kv_lora_rank=16
egmla-kv model=120m attention=mha,gqa,mqa,mla,egmla      # comma values expand into one row each
egmla-kv --paper                                          # the paper's Table 1 KV column, recomputed
"""

from __future__ import annotations

import argparse
import csv
import functools
import itertools
import json
import sys
from collections.abc import Sequence
from datetime import date
from pathlib import Path

from . import accounting
from .config import compose, model_config
from .model import ConfigError, ModelConfig

# Table 1 of the paper (docs/paper.md): label, overrides, the paper's KV elements/token and 7-task average accuracy.
PAPER_TABLE1 = [
    ("MHA (12L/768d)", ["model=120m", "attention=mha"], 18432, None),
    ("MLA-Base", ["model=120m", "attention=mla"], 3840, 43.84),
    ("EG-MLA kv256", ["model=120m", "attention=egmla", "attention.kv_lora_rank=256"], 3840, 44.46),
    ("EG-MLA kv64", ["model=120m", "attention=egmla", "attention.kv_lora_rank=64"], 1536, 44.33),
    ("EG-MLA kv16", ["model=120m", "attention=egmla", "attention.kv_lora_rank=16"], 960, None),
]


def expand_sweep(overrides: Sequence[str]) -> list[list[str]]:
    """["a=x,y", "b=1"] -> [["a=x", "b=1"], ["a=y", "b=1"]] (values in brackets or quotes stay whole)."""
    choices = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and "," in value and not value.startswith(("[", "{", "'", '"')):
            choices.append([f"{key}={v}" for v in value.split(",")])
        else:
            choices.append([item])
    return [list(combo) for combo in itertools.product(*choices)]


def _references(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """The same model with MHA, and with MLA at its size's defaults (attention overrides dropped)."""
    base = [o for o in overrides if not o.lstrip("+~").startswith("attention")]
    return base + ["attention=mha"], base + ["attention=mla"]


@functools.cache
def _model_config(overrides: tuple[str, ...]) -> ModelConfig:
    """Composing through Hydra takes ~80 ms: each selection (and its MHA / MLA references) is composed once."""
    return model_config(compose(overrides))


def row(overrides: Sequence[str], dtype: str, seq: int | None) -> dict:
    cfg = _model_config(tuple(overrides))
    mha, mla = (_model_config(tuple(r)) for r in _references(overrides))
    s = accounting.summary(cfg, dtype, seq)
    return {
        "selection": " ".join(overrides) or "(defaults)",
        "variant": cfg.attention.variant,
        "layers": cfg.n_layers,
        **{f"kv_{k}": v for k, v in s["kv"].items()},
        **{f"params_{k}": v for k, v in s["params"].items()},
        "flops_per_token": s["flops_per_token"],
        "seq_len": seq or cfg.max_seq_len,
        "saving_vs_mha": accounting.saving(cfg, mha),
        "saving_vs_mla": accounting.saving(cfg, mla),
    }


def _m(n: int) -> str:
    return f"{n / 1e6:,.2f}M"


def _table(header: list[str], rows: list[list[str]]) -> str:
    # By hand rather than pandas' to_markdown or tabulate: tabulate is not an egmla dependency (lm-eval's
    # sacrebleu happens to pull it in) and these few lines keep the output exactly as table.md has it.
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def format_rows(rows: list[dict]) -> str:
    dtype = rows[0]["kv_dtype"]
    header = [
        "selection",
        "KV el/layer",
        "KV el/token",
        f"KV B/token ({dtype})",
        "ids B/token",
        "non-emb params",
        "embedding",
        "gate tables",
        "GFLOP/token",
        "vs MHA",
        "vs MLA",
    ]
    body = [
        [
            r["selection"],
            f"{r['kv_elements_per_layer']:,}",
            f"{r['kv_elements_per_token']:,}",
            f"{r['kv_bytes_per_token']:,}",
            f"{r['kv_id_bytes_per_token']}",
            _m(r["params_non_embedding"]),
            _m(r["params_embedding"]),
            _m(r["params_gate_tables"]),
            f"{r['flops_per_token'] / 1e9:.3f}",
            f"{100 * r['saving_vs_mha']:.2f}%",
            f"{100 * r['saving_vs_mla']:.2f}%",
        ]
        for r in rows
    ]
    note = (
        "KV: cache elements per token summed over layers; ids: int32 token ids EG-MLA keeps to recompute a "
        "content gate (not KV).\nFLOP/token: training fwd+bwd, 6 x matmul params + 6 x layers x heads x "
        f"(d_qk + d_v) x seq (seq {rows[0]['seq_len']}). Savings: KV cache vs the same size with attention=mha / "
        "attention=mla."
    )
    return _table(header, body) + "\n\n" + note


def paper_table(dtype: str) -> tuple[str, list[dict]]:
    rows, body = [], []
    for label, overrides, paper_kv, paper_acc in PAPER_TABLE1:
        r = row(overrides, dtype, None) | {"label": label, "paper_kv_elements": paper_kv, "paper_avg_acc": paper_acc}
        rows.append(r)
        cfg = _model_config(tuple(overrides))
        a = cfg.attention
        body.append(
            [
                label,
                str(a.kv_lora_rank) if cfg.is_latent else "-",
                str(a.qk_rope_head_dim) if cfg.is_latent else "-",
                f"{r['kv_elements_per_token']:,} ({r['kv_elements_per_token'] / 1e3:.2f}K)",
                f"{paper_kv:,}",
                "yes" if r["kv_elements_per_token"] == paper_kv else "NO",
                f"{r['kv_bytes_per_token']:,}",
                f"{100 * r['saving_vs_mha']:.2f}%",
                f"{100 * r['saving_vs_mla']:.2f}%",
                _m(r["params_gate_tables"]),
                "-" if paper_acc is None else f"{paper_acc:.2f}",
            ]
        )
    header = [
        "model (120M: 12L, d768, 12 heads)",
        "d_c",
        "d_rope",
        "KV elements/token",
        "paper",
        "match",
        f"KV B/token ({dtype})",
        "vs MHA",
        "vs MLA-Base",
        "gate tables",
        "paper avg acc",
    ]
    kv64 = next(r for r in rows if r["label"] == "EG-MLA kv64")
    text = (
        "Paper Table 1, KV-cache column, recomputed from conf/ (EG-MLA, arXiv 2509.16686)\n\n"
        + _table(header, body)
        + f"\n\nEG-MLA kv64 saves {100 * kv64['saving_vs_mha']:.2f}% of MHA's KV cache (paper: 'over 91.6%') and "
        f"{100 * kv64['saving_vs_mla']:.1f}% of MLA-Base's (paper: 'up to 59.9%', from rounded K figures).\n"
        "Gate tables (12 x 50,257 x 256 for emb256) are token-id lookups recomputed at inference: no KV cache."
    )
    return text, rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="egmla-kv",
        description="KV-cache, parameter and FLOP accounting of model selections (Hydra overrides), no training.",
        epilog="example: egmla-kv model=120m attention=mha,mla,egmla attention.gate_dim=256",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides; comma-separated values expand into rows")
    parser.add_argument("--paper", action="store_true", help="print the paper's Table 1 KV column (120M)")
    parser.add_argument("--dtype", default="bf16", choices=list(accounting.DTYPE_BYTES), help="cache dtype")
    parser.add_argument("--seq", type=int, default=None, help="sequence length for FLOPs (default max_seq_len)")
    parser.add_argument("--json", action="store_true", help="print machine-readable rows instead of a table")
    parser.add_argument("--out", type=Path, default=None, help="also write table.md and results.csv to this folder")
    args = parser.parse_args(argv)
    try:
        if args.paper:
            text, rows = paper_table(args.dtype)
        else:
            rows = [row(o, args.dtype, args.seq) for o in expand_sweep(args.overrides)]
            text = format_rows(rows)
    except ConfigError as exc:
        print(f"egmla-kv: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=2) if args.json else text)
    if args.out:
        write_outputs(args.out, text, rows, ["egmla-kv", *(argv if argv is not None else sys.argv[1:])])
    return 0


def write_outputs(out: Path, text: str, rows: list[dict], command: list[str]) -> None:
    """table.md (with the command, date and commit that produced it) and results.csv."""
    from .train.rundir import git_commit

    out.mkdir(parents=True, exist_ok=True)
    git = git_commit()
    header = (
        f"Produced by `{' '.join(command)}` on {date.today().isoformat()}, commit {git['commit'] or 'unknown'}"
        f"{' (with local changes)' if git['dirty'] else ''}. Analytic: no training, any machine gives these numbers.\n"
    )
    (out / "table.md").write_text(header + "\n```\n" + text + "\n```\n")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    sys.exit(main())
