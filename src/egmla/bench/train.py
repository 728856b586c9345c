"""`egmla-bench train`: training-step throughput of each attention variant, in one process, on one device.

    egmla-bench train --size 120m --variants mha mla egmla --seq 2048 --batch 16
    egmla-bench train --size tiny --seq 128 --batch 4 --steps 3 --warmup 1     # CPU smoke run

Each variant gets the same loop as egmla-train's inner step (bf16 autocast on GPU, fused AdamW, gradient
clipping at 1.0, optional torch.compile) on random token ids, so the figures isolate the model from data
loading. Reported: tokens/s, MFU (DESIGN.md convention; GPU only), peak memory, and tokens/s relative to the
first variant (MHA by default), measured in this same run.
"""

from __future__ import annotations

import csv
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import accounting
from ..config import build_model, compose
from ..model import ConfigError
from ..train.perf import peak_flops
from ..train.rundir import git_commit

CSV_COLUMNS = ["variant", "size", "seq", "batch", "gpus", "card", "tok_per_s", "mfu", "peak_mem_gib", "date", "commit"]


def bench_variant(size: str, variant: str, seq: int, batch: int, steps: int, warmup: int, compile: bool,
                  overrides: list[str], device: torch.device, profile: bool = False,
                  compile_loss: bool = False) -> dict:  # fmt: skip
    cfg = compose([f"model={size}", f"attention={variant}", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    if compile:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    vocab = model.cfg.vocab_size
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    if compile_loss:  # lets inductor fuse the fp32 cast into the softmax instead of materialising fp32 logits
        loss_fn = torch.compile(loss_fn)

    def step() -> None:
        ids = torch.randint(0, vocab, (batch, seq + 1), device=device)
        with autocast:
            logits = model(ids[:, :-1])
        loss = loss_fn(logits, ids[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if profile:
        _profile(step, device, cfg.attention.name)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    tok_per_s = batch * seq * steps / seconds
    peak = peak_flops(device)
    return {
        "variant": cfg.attention.name,
        "size": size,
        "seq": seq,
        "batch": batch,
        "gpus": 1 if device.type == "cuda" else 0,
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "tok_per_s": tok_per_s,
        "mfu": accounting.flops_per_token(model.cfg, seq) * tok_per_s / peak if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "date": date.today().isoformat(),
        "commit": (git_commit()["commit"] or "")[:12],
    }


def _profile(step, device: torch.device, name: str, steps: int = 3) -> None:
    """Print the operators that cost the most device (or CPU) time over a few steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n--- profile: {name}, {steps} steps, by {key}")
    print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60))


def format_table(rows: list[dict]) -> str:
    base = rows[0]["tok_per_s"]
    lines = [f"{'variant':<22} {'tok/s':>10} {'vs ' + rows[0]['variant']:>10} {'MFU':>7} {'peak GiB':>9}"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        lines.append(f"{r['variant']:<22} {r['tok_per_s']:>10,.0f} {r['tok_per_s'] / base:>9.3f}x {mfu:>7} {mem:>9}")
    return "\n".join(lines)


def add_parser(sub) -> None:
    train = sub.add_parser("train", help="training-step throughput per attention variant",
                           description=__doc__.split("\n\n")[0])  # fmt: skip
    train.add_argument("--size", default="120m", help="model size (conf/model/*.yaml)")
    train.add_argument("--variants", nargs="+", default=["mha", "gqa", "mqa", "mla", "egmla"])
    train.add_argument("--seq", type=int, default=2048)
    train.add_argument("--batch", type=int, default=16)
    train.add_argument("--steps", type=int, default=20, help="timed steps")
    train.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    train.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    train.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="Hydra overrides for every variant")
    train.add_argument("--csv", type=Path, default=None, help="append rows to this CSV file")
    train.add_argument("--profile", action="store_true", help="print the top operators of each variant")
    train.add_argument("--compile-loss", action="store_true", help="also torch.compile the cross-entropy")
    train.set_defaults(run=run)


def run(args) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    overrides = [f"model.max_seq_len={max(args.seq, 1)}", *args.set]
    rows = []
    try:
        for variant in args.variants:
            rows.append(bench_variant(args.size, variant, args.seq, args.batch, args.steps, args.warmup,
                                      not args.no_compile and device.type == "cuda", overrides, device,
                                      args.profile, args.compile_loss))  # fmt: skip
            print(format_table(rows).splitlines()[-1], flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except ConfigError as exc:
        print(f"egmla-bench: error: {exc}", file=sys.stderr)
        return 2
    print(f"\n{args.size}, seq {args.seq}, batch {args.batch}, {rows[0]['card']}, {args.steps} timed steps\n")
    print(format_table(rows))
    if args.csv:
        new = not args.csv.exists()
        with open(args.csv, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerows(rows)
    return 0
