"""`egmla-bench train`: training-step throughput of each attention variant, on one GPU or sharded over several.

    egmla-bench train --size 120m --variants mha mla egmla --seq 2048 --batch 16
    egmla-bench train --size 1.2b --variants egmla --batch 8 --gpus 4        # FSDP2 over 4 GPUs (torchrun)
    egmla-bench train --size tiny --seq 128 --batch 4 --steps 3 --warmup 1     # CPU smoke run
    egmla-bench train --variants mla egmla egmla:attention.fused_expand=true    # a setting A/B in one process

Each variant gets egmla-train's inner step on random token ids, so the figures isolate the model from data
loading: one GPU: bf16 autocast, torch.compile of the whole model and of the loss; several GPUs: FSDP2 exactly
as trainer=fsdp applies it (blocks compiled one by one, bf16 mixed-precision policy); then fused AdamW and
gradient clipping at 1.0. --loss fused (the default, as train.fused_loss): the output head and cross-entropy
fused chunk by chunk; plain: full logits, then the loss. --batch is per GPU. Reported: tokens/s of all GPUs,
MFU per GPU (docs/design.md convention), peak memory of the fullest GPU, and tokens/s relative to the first variant,
measured in this run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .. import accounting
from ..config import build_model, compose
from ..model import ConfigError
from ..train import fsdp
from ..train.module import cross_entropy
from ..train.perf import peak_flops
from ..train.rundir import append_csv, bench_stamp
from .timing import bench_device

LOSSES = ("fused", "plain")
CSV_COLUMNS = ["variant", "size", "seq", "batch", "gpus", "card", "tok_per_s", "mfu", "peak_mem_gib", "date", "commit"]


def bench_variant(
    size: str,
    variant: str,
    seq: int,
    batch: int,
    steps: int,
    warmup: int,
    compile: str | None,
    overrides: list[str],
    device: torch.device,
    profile: bool = False,
    activation_checkpointing: str = "none",
    reshard_after_forward: bool = True,
    prefetch: int = 0,
    loss: str = "fused",
    window: int = 0,
) -> dict:
    name, *extra = variant.split(":")  # NAME[:KEY=VALUE...]: Hydra overrides for this entry alone
    cfg = compose([f"model={size}", f"attention={name}", *overrides, *extra])
    if compile:  # each variant compiles as in a process of its own, none behind earlier graphs' guards
        torch.compiler.reset()
    sharded = dist.is_initialized()
    world = dist.get_world_size() if sharded else 1
    torch.manual_seed(0)
    model = build_model(cfg)
    mesh = None
    if sharded:  # exactly as LanguageModel.configure_model does under trainer=fsdp
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world,))
    else:
        model.to(device)
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    fsdp.prepare_model(model, activation_checkpointing, compile, mesh, precision, reshard_after_forward, prefetch)
    loss_fn = torch.compile(cross_entropy) if compile and loss == "plain" else cross_entropy
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    vocab = model.cfg.vocab_size
    # Under FSDP2 the mixed-precision policy casts the parameters; autocast is for the unsharded model only.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and not sharded)
    generator = torch.Generator(device).manual_seed(dist.get_rank() if sharded else 0)

    def step() -> None:
        ids = torch.randint(0, vocab, (batch, seq + 1), device=device, generator=generator)
        inputs, targets = ids[:, :-1], ids[:, 1:]
        with autocast:
            out = model(inputs, targets=targets) if loss == "fused" else model(inputs)
        value = out if loss == "fused" else loss_fn(out, targets)
        value.backward()
        fsdp.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if profile:
        _profile(step, device, cfg.attention.name)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = mark = time.perf_counter()
    windows = []  # tok/s of each `window` timed steps, synchronised at their ends as egmla-train's log points are
    for i in range(1, steps + 1):
        step()
        if window and i % window == 0:
            _sync(device)
            now = time.perf_counter()
            windows.append(batch * seq * window * world / (now - mark))
            mark = now
    _sync(device)
    seconds = time.perf_counter() - start
    tok_per_s = batch * seq * steps * world / seconds
    peak = peak_flops(device)
    peak_mem = None
    if device.type == "cuda":
        peak_mem = torch.tensor(torch.cuda.max_memory_allocated(device) / 2**30, device=device)
        if sharded:  # the fullest GPU's
            dist.all_reduce(peak_mem, op=dist.ReduceOp.MAX)
    return {
        "variant": ":".join([cfg.attention.name, *extra]),
        "size": size,
        "seq": seq,
        "batch": batch,
        "gpus": world if device.type == "cuda" else 0,  # CPU processes are not GPUs
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "tok_per_s": tok_per_s,
        "mfu": accounting.flops_per_token(model.cfg, seq) * tok_per_s / (peak * world) if peak else None,
        "peak_mem_gib": float(peak_mem) if peak_mem is not None else None,
        "windows": windows,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()


def _profile(step, device: torch.device, name: str, steps: int = 3) -> None:
    """Print the operators that cost the most device (or CPU) time over a few steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"\n--- profile: {name}, {steps} steps, by {key}")
        print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60))


def format_table(rows: list[dict]) -> str:
    base = rows[0]["tok_per_s"]
    w = max(22, *(len(r["variant"]) for r in rows))
    lines = [
        f"{'variant':<{w}} {'tok/s':>10} {'per GPU':>10} {'vs ' + rows[0]['variant']:>10} {'MFU':>7} {'peak GiB':>9}"
    ]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        per_gpu = r["tok_per_s"] / max(1, r["gpus"])
        lines.append(
            f"{r['variant']:<{w}} {r['tok_per_s']:>10,.0f} {per_gpu:>10,.0f} {r['tok_per_s'] / base:>9.3f}x "
            f"{mfu:>7} {mem:>9}"
        )
    return "\n".join(lines)


def add_parser(sub) -> None:
    train = sub.add_parser(
        "train", help="training-step throughput per attention variant", description=__doc__.split("\n\n")[0]
    )
    train.add_argument("--size", default="120m", help="model size (conf/model/*.yaml)")
    train.add_argument(
        "--variants",
        nargs="+",
        default=["mha", "gqa", "mqa", "mla", "egmla"],
        help="attention configs (conf/attention); NAME:KEY=VALUE[:KEY=VALUE] adds Hydra overrides "
        "for that entry alone, e.g. egmla:attention.fused_expand=true",
    )
    train.add_argument("--seq", type=int, default=2048)
    train.add_argument("--batch", type=int, default=16, help="sequences per GPU per step")
    train.add_argument("--gpus", type=int, default=1, help="GPUs to shard over with FSDP2 (launched by torchrun)")
    train.add_argument("--steps", type=int, default=20, help="timed steps")
    train.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    train.add_argument(
        "--window",
        type=int,
        default=0,
        help="also print tok/s over every N timed steps (synchronised at each window's end, as egmla-train's log "
        "points are, which the CSV row's mean then includes): does the rate hold over a long run?",
    )
    train.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    train.add_argument(
        "--compile-scope",
        default="model",
        choices=fsdp.COMPILE_SCOPES,
        help="one GPU: one graph, or one per block (always per block with --gpus)",
    )
    train.add_argument("--ac", default="none", choices=fsdp.AC_MODES, help="activation checkpointing")
    train.add_argument("--no-reshard", action="store_true", help="FSDP2: keep parameters gathered for the backward")
    train.add_argument("--prefetch", type=int, default=0, help="FSDP2: blocks gathered ahead explicitly (0: implicit)")
    train.add_argument(
        "--loss",
        default="fused",
        choices=LOSSES,
        help="fused: head and cross-entropy chunk by chunk; plain: full logits first",
    )
    train.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="Hydra overrides for every variant")
    train.add_argument("--csv", type=Path, default=None, help="append rows to this CSV file")
    train.add_argument("--profile", action="store_true", help="print the top operators of each variant")
    train.set_defaults(run=run)


def run(args) -> int:
    if args.window < 0:
        print(f"egmla-bench: error: --window {args.window} is invalid: expected N >= 0 (0: none)", file=sys.stderr)
        return 2
    if args.gpus > 1 and "LOCAL_RANK" not in os.environ:  # relaunch: one process per GPU (per CPU process without)
        if torch.cuda.is_available() and torch.cuda.device_count() < args.gpus:
            print(
                f"egmla-bench: error: --gpus {args.gpus} but {torch.cuda.device_count()} GPUs are visible",
                file=sys.stderr,
            )
            return 2
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={args.gpus}",
            "-m",
            "egmla.bench",
            *args.argv,
        ]
        return subprocess.run(command).returncode
    device = bench_device(args.size)
    if device is None:
        return 2
    if "LOCAL_RANK" in os.environ and device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    elif "LOCAL_RANK" in os.environ:
        dist.init_process_group("gloo")
    rank_zero = not dist.is_initialized() or dist.get_rank() == 0
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    overrides = [f"model.max_seq_len={max(args.seq, 1)}", *args.set]
    compile_scope = None if args.no_compile or device.type != "cuda" else args.compile_scope
    rows, stamp = [], bench_stamp()
    try:
        for i, variant in enumerate(args.variants, 1):
            if rank_zero:  # the warm-up holds the compilation: about a minute a variant on a GPU
                compiling = " (compiling)" if compile_scope else ""
                print(
                    f"[{i}/{len(args.variants)}] {variant}: {args.warmup} warm-up steps{compiling}, then "
                    f"{args.steps} timed",
                    file=sys.stderr,
                    flush=True,
                )
            row = bench_variant(
                args.size,
                variant,
                args.seq,
                args.batch,
                args.steps,
                args.warmup,
                compile_scope,
                overrides,
                device,
                args.profile,
                args.ac,
                not args.no_reshard,
                args.prefetch,
                args.loss,
                args.window,
            )
            rows.append(row | stamp)
            if rank_zero:
                print(format_table(rows).splitlines()[-1], flush=True)
                if row["windows"]:
                    rates = " ".join(f"{rate:,.0f}" for rate in row["windows"])
                    print(f"  tok/s per {args.window} steps: {rates}", flush=True)
                if args.csv:  # row by row: a run cut short keeps what it measured
                    append_csv(args.csv, rows[-1:], CSV_COLUMNS)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except ConfigError as exc:
        print(f"egmla-bench: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if not rank_zero:
        return 0
    gpus = f"{rows[0]['gpus']} x " if rows[0]["gpus"] > 1 else ""
    print(
        f"\n{args.size}, seq {args.seq}, batch {args.batch}/GPU, {gpus}{rows[0]['card']}, {args.steps} timed steps, "
        f"{args.loss} loss\n"
    )
    print(format_table(rows))
    return 0
