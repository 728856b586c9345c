"""`egmla-bench decode`: what each variant's KV saving buys at decode time, in one process, on one device.

    egmla-bench decode --size 120m --context 1024 4096 16384 32768 --batch 32 --budget-gib 40 --max-batch-run 1024
    egmla-bench decode --size tiny --context 64 --batch 2 --steps 2 --warmup 1      # CPU smoke run

For each variant and context length L: prefill L random token ids (uniform, or text-like with --ids zipf) for
every sequence of the batch for real (the model's forward with its decode cache, in chunks), check the cache's
measured bytes against the analytic formula, then time the decode step at position L: one new token per
sequence through the whole model (every layer and the output head). On a GPU the step is captured in a CUDA
graph and replayed (same graph for every variant, so no variant pays Python or launch overhead) and timed with
CUDA events; on CPU, wall clock.

Variants: mha, gqa, mqa (SDPA over the cache), mla_absorbed (attention over the latent, MQA-style),
egmla_latent_absorbed (EG-MLA gating the latent, MLA's absorbed path), egmla (gating the content, unfused:
re-expands K/V and recomputes the gate every step), egmla_fused (the fused kernel, gate rows from a
precomputed per-vocabulary table) and egmla_fused_emb (the fused kernel recomputing the gate from the
embedding). Fused rows are compared with the unfused path on the same cache first and refused (no row, exit 1)
unless they match; a fused row that ran the PyTorch reference algorithm instead of Triton (CPU) is named
*_reference.

The memory budget counts what decoding must keep per sequence: the KV cache tensors plus, for EG-MLA gating
the content, the context's token ids (int32). Weights and the fused kernel's gate table are shared by all
sequences and reported apart.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .. import accounting, kernels
from ..config import build_model, compose
from ..model import ConfigError
from ..train.rundir import append_csv, bench_stamp
from .timing import bench_device, cuda_milliseconds

CSV_COLUMNS = [
    "variant",
    "size",
    "context",
    "batch",
    "card",
    "cache_bytes_measured",
    "cache_bytes_analytic",
    "step_ms",
    "tok_per_s",
    "max_batch_in_budget",
    "budget_gib",
    "us_per_seq_layer",
    "date",
    "commit",
]
VARIANTS = {
    "mha": ["attention=mha"],
    "gqa": ["attention=gqa"],
    "mqa": ["attention=mqa"],
    "mla_absorbed": ["attention=mla", "attention.absorb=true"],
    "egmla_latent_absorbed": ["attention=egmla", "attention.gate_on=latent", "attention.absorb=true"],
    "egmla": ["attention=egmla"],
    "egmla_fused": ["attention=egmla"],  # gate rows gathered from the precomputed per-vocabulary table
    "egmla_fused_emb": ["attention=egmla"],  # gate recomputed from the embedding rows
}
DEFAULT_VARIANTS = ["mha", "gqa", "mqa", "mla_absorbed", "egmla_latent_absorbed", "egmla", "egmla_fused"]
GATE_SOURCE = {"egmla_fused": "table", "egmla_fused_emb": "embedding"}
MATCH_TOLERANCE = 1e-2  # relative error of the fused step against the unfused one


class BenchError(RuntimeError):
    """A result that must not be reported (cache bytes off the formula, fused output off the reference)."""


# --- bookkeeping ------------------------------------------------------------------------------------------
def us_per_seq_layer(step_ms: float, batch: int, n_layers: int) -> float:
    """Decode-step time per sequence per layer, in microseconds."""
    return step_ms * 1e3 / (batch * n_layers)


def bytes_per_sequence(cfg, context: int, element_bytes: int) -> int:
    """What one sequence of `context` tokens keeps while decoding: its KV cache plus kept token ids."""
    return context * (accounting.kv_bytes_per_token(cfg, element_bytes) + accounting.id_bytes_per_token(cfg))


def max_batch_in_budget(cfg, context: int, budget_gib: float, element_bytes: int = 2) -> int:
    """The most sequences of `context` tokens whose cache and kept ids fit in budget_gib GiB."""
    return int(budget_gib * 2**30) // bytes_per_sequence(cfg, context, element_bytes)


def expand_variants(names: list[str], gate_source: str) -> list[str]:
    """egmla_fused stands for the gate sources asked for: table (egmla_fused), embedding (egmla_fused_emb)."""
    out = []
    for name in names:
        if name not in VARIANTS:
            raise ConfigError(f"--variants {name!r} is invalid: expected some of {', '.join(VARIANTS)}")
        if name == "egmla_fused" and gate_source != "table":
            out += ["egmla_fused_emb"] if gate_source == "embedding" else ["egmla_fused", "egmla_fused_emb"]
        else:
            out.append(name)
    return list(dict.fromkeys(out))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# --- cache helpers ----------------------------------------------------------------------------------------
def cache_rows(cache, r0: int, r1: int):
    """A DecodeCache over rows [r0, r1) of `cache`, sharing its storage (writes land in `cache`)."""
    view = copy.copy(cache)
    view.layers = []
    for layer in cache.layers:
        sub = copy.copy(layer)
        sub.buffers = {name: buf[r0:r1] for name, buf in layer.buffers.items()}
        view.layers.append(sub)
    view.ids = cache.ids[r0:r1] if cache.ids is not None else None
    return view


@contextmanager
def attention_set(model, name: str, value):
    """Temporarily set attribute `name` on every attention module that has it."""
    saved = [(b.attn, getattr(b.attn, name)) for b in model.blocks if hasattr(b.attn, name)]
    for attn, _ in saved:
        setattr(attn, name, value)
    try:
        yield
    finally:
        for attn, old in saved:
            setattr(attn, name, old)


ID_DISTRIBUTIONS = ("uniform", "zipf")


def sample_ids(
    vocab: int, shape: tuple[int, ...], distribution: str, generator: torch.Generator, device
) -> torch.Tensor:
    """Random token ids [shape]: uniform over the vocabulary (every gate-table row as likely: the fused kernel's
    worst case), or Zipf, P(id) proportional to 1 / (id + 1) (text-like: a few frequent tokens whose gate rows
    can stay in L2; GPT-2's ids roughly follow merge frequency, so low ids are the frequent ones)."""
    if distribution == "uniform":
        return torch.randint(0, vocab, shape, generator=generator, device=device)
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float32, device=device)
    flat = torch.multinomial(weights, math.prod(shape), replacement=True, generator=generator)
    return flat.view(shape)


@torch.no_grad()
def prefill(
    model,
    cache,
    context: int,
    rows_per_pass: int,
    chunk: int,
    generator: torch.Generator,
    ids_distribution: str = "uniform",
) -> None:
    """Fill the cache with `context` random tokens per sequence by running the model over them for real.

    Absorbed variants prefill through the expanded path: the cache holds the same latent and RoPE key either
    way, and SDPA's fused kernels serve the expanded shapes far better.
    """
    buffer = next(iter(cache.layers[0].buffers.values()))
    batch, device = buffer.shape[0], buffer.device
    with attention_set(model, "absorb", False):
        for r0 in range(0, batch, rows_per_pass):
            r1 = min(batch, r0 + rows_per_pass)
            ids = sample_ids(model.cfg.vocab_size, (r1 - r0, context), ids_distribution, generator, device)
            rows = cache_rows(cache, r0, r1)
            for s0 in range(0, context, chunk):
                model(ids[:, s0 : s0 + chunk], rows, last_only=True)
    cache.length = context


# --- measurements -----------------------------------------------------------------------------------------
@contextmanager
def recording_fused_calls(model, calls: list):
    """Record (attention, its gate table, inputs, output) of every fused-kernel call made inside the block."""
    layers = [
        (b.attn, model.gate_table(i), b.attn.fused_decode)
        for i, b in enumerate(model.blocks)
        if getattr(b.attn, "fused_decode", None) is not None
    ]

    def recorder(attn, gate_table, fused):
        def record(*inputs):
            out = fused(*inputs)
            calls.append((attn, gate_table, inputs, out))
            return out

        return record

    for attn, gate_table, fused in layers:
        attn.fused_decode = recorder(attn, gate_table, fused)
    try:
        yield
    finally:
        for attn, _, fused in layers:
            attn.fused_decode = fused


@torch.no_grad()
def unfused_fp32(attn, gate_table, q_nope, q_rope, latent, k_rope, ids) -> torch.Tensor:
    """The model's own unfused decode of one layer (expand, gate, normalise, SDPA) on the same inputs, in fp32."""
    # The fused decode (its gate table, its views of the weights) is not copied: the reference recomputes its gate.
    fused, attn.fused_decode = attn.fused_decode, None
    try:
        ref = copy.deepcopy(attn).float()
    finally:
        attn.fused_decode = fused
    gate = ref.gate(torch.nn.functional.embedding(ids, gate_table.weight.float()))[0]
    y = ref._attend(
        q_nope[:, :, None].float(), q_rope[:, :, None].float(), *ref.expand(latent.float(), k_rope.float(), gate)
    )
    return y[:, :, 0]


@torch.no_grad()
def check_fused(model, cache, next_ids: torch.Tensor, rows: int) -> tuple[float, float]:
    """Relative errors of the fused step on the first `rows` sequences of the cache: (the kernel's output
    against the model's unfused decode run in fp32 on the very same inputs, largest over layers; the step's
    logits against the unfused step's on the same cache, in the model's dtype).

    Only the first decides: in bf16 the unfused step rounds its expanded K/V, gate and norms to bf16, and those
    roundings, carried through the residual stream, move the logits by about 2e-2 (measured at 120m) while the
    fused kernel itself stays within 3e-3 of fp32."""
    context = cache.length
    view = cache_rows(cache, 0, rows)
    calls: list = []
    with recording_fused_calls(model, calls):
        view.length = context
        fused = model(next_ids[:rows], view)
    with attention_set(model, "fused_decode", None):
        view.length = context
        unfused = model(next_ids[:rows], view)
    kernel = max(relative_error(out, unfused_fp32(attn, table, *inputs)) for attn, table, inputs, out in calls)
    return kernel, relative_error(fused, unfused)


@torch.no_grad()
def time_step(model, cache, next_ids: torch.Tensor, steps: int, warmup: int, graph: bool) -> float:
    """Milliseconds of one decode step at position cache.length (the step is replayed at the same position)."""
    context = cache.length

    def step():
        cache.length = context
        return model(next_ids, cache)

    device = next_ids.device
    if device.type != "cuda":
        for _ in range(warmup):
            step()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        cache.length = context
        return (time.perf_counter() - start) * 1e3 / steps

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # compiles Triton kernels and settles the allocator before any capture
        for _ in range(max(warmup, 1)):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    run, cuda_graph = step, None
    if graph:
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            step()
        run = cuda_graph.replay
    milliseconds = cuda_milliseconds(run, steps, warmup)
    cache.length = context
    del cuda_graph
    return milliseconds


def bench_row(model, name: str, size: str, context: int, batch: int, args, device, card: str) -> dict:
    cfg = model.cfg
    element = model.embed.weight.element_size()
    cache = model.new_cache(batch, context + 1)
    generator = torch.Generator(device).manual_seed(context)
    prefill(model, cache, context, args.prefill_rows, args.prefill_chunk, generator, args.ids)
    measured, analytic = cache.kv_bytes(), batch * context * accounting.kv_bytes_per_token(cfg, element)
    if measured != analytic:
        raise BenchError(f"{name}: measured cache bytes {measured} != analytic {analytic} at context {context}")
    next_ids = sample_ids(cfg.vocab_size, (batch, 1), args.ids, generator, device)
    if name in GATE_SOURCE or name.endswith("_reference"):
        kernel, logits = check_fused(model, cache, next_ids, min(batch, args.check_rows))
        if not kernel < MATCH_TOLERANCE:
            raise BenchError(
                f"{name} at context {context}, batch {batch}: the fused kernel does not match the "
                f"unfused path (relative error {kernel:.3g} >= {MATCH_TOLERANCE}); no row written"
            )
        print(
            f"  {name}: the fused kernel matches the unfused path (relative error {kernel:.1e}, every layer, "
            f"against fp32 on the same inputs); step logits against the unfused step: {logits:.1e}",
            flush=True,
        )
    step_ms = time_step(model, cache, next_ids, args.steps, args.warmup, device.type == "cuda" and not args.no_graph)
    del cache
    return {
        "variant": name,
        "size": size,
        "context": context,
        "batch": batch,
        "card": card,
        "cache_bytes_measured": measured,
        "cache_bytes_analytic": analytic,
        "step_ms": step_ms,
        "tok_per_s": batch * 1e3 / step_ms,
        "max_batch_in_budget": max_batch_in_budget(cfg, context, args.budget_gib, element),
        "budget_gib": args.budget_gib,
        "us_per_seq_layer": us_per_seq_layer(step_ms, batch, cfg.n_layers),
    }


def build(
    size: str, name: str, max_len: int, overrides: list[str], device, dtype, backend: str, launch: kernels.LaunchOptions
):
    """The variant's model on the device; fused variants get the fused decode. Returns (model, row name)."""
    cfg = compose([f"model={size}", *VARIANTS[name], f"model.max_seq_len={max_len}", *overrides])
    heads = launch.heads_per_program
    if name in GATE_SOURCE and heads:  # refused before building and prefilling, not at the first decode step
        kernels.check_heads_per_program(heads, cfg.model.n_heads, f"--heads-per-program {heads}")
    torch.manual_seed(0)
    model = build_model(cfg).to(device=device, dtype=dtype).eval()
    if name in GATE_SOURCE:
        used = model.enable_fused_decode(GATE_SOURCE[name], backend, launch)
        if used == "reference":
            name += "_reference"  # the PyTorch algorithm, not the Triton kernel: never mistaken for it
    return model, name


def describe(model, name: str) -> str:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    table = sum(b.attn.fused_decode.table_bytes for b in model.blocks if getattr(b.attn, "fused_decode", None))
    extra = f", gate table {table / 2**30:.2f} GiB" if table else ""
    ids = accounting.id_bytes_per_token(model.cfg)
    kv = accounting.kv_bytes_per_token(model.cfg, model.embed.weight.element_size())
    return f"{name}: KV {kv} B/token{f' + ids {ids} B/token' if ids else ''}; weights {weights / 2**30:.2f} GiB{extra}"


# --- report -----------------------------------------------------------------------------------------------
def format_table(rows: list[dict]) -> str:
    """One line per row; ratios against MHA's row at the same context and batch kind (timed or largest)."""
    head = (
        f"{'variant':<26} {'ctx':>6} {'batch':>6} {'cache MiB':>10} {'step ms':>9} {'tok/s':>10} {'x MHA':>6} "
        f"{'us/seq/layer':>12} {'x MHA':>6} {'max batch':>9} {'x MHA':>6}"
    )
    lines = [head]
    for r in rows:
        base = next(
            (b for b in rows if b["variant"] == "mha" and b["context"] == r["context"] and b["at_max"] == r["at_max"]),
            None,
        )

        def ratio(key, r=r, base=base):
            return f"{r[key] / base[key]:.2f}" if base and base[key] else "-"

        lines.append(
            f"{r['variant']:<26} {r['context']:>6} {r['batch']:>6} {r['cache_bytes_measured'] / 2**20:>10.1f} "
            f"{r['step_ms']:>9.3f} {r['tok_per_s']:>10,.0f} {ratio('tok_per_s'):>6} "
            f"{r['us_per_seq_layer']:>12.2f} {ratio('us_per_seq_layer'):>6} {r['max_batch_in_budget']:>9} "
            f"{ratio('max_batch_in_budget'):>6}"
        )
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "decode",
        help="decode-step latency, cache bytes and batch in a memory budget per variant",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--size", default="120m", help="model size (conf/model/*.yaml)")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, help=f"some of {', '.join(VARIANTS)}")
    p.add_argument("--context", nargs="+", type=int, default=[1024, 4096, 16384, 32768], help="context lengths")
    p.add_argument("--batch", type=int, default=32, help="the timed batch")
    p.add_argument(
        "--budget-gib",
        type=float,
        default=40.0,
        help="memory budget for what each sequence keeps: KV cache tensors + kept token ids (EG-MLA "
        "gating the content); weights and the fused gate table are reported apart",
    )
    p.add_argument(
        "--max-batch-run",
        type=int,
        default=0,
        metavar="CAP",
        help="also time each variant at its largest batch in the budget, capped at CAP (0: off)",
    )
    p.add_argument(
        "--ids",
        choices=ID_DISTRIBUTIONS,
        default="uniform",
        help="token ids of the context: uniform (every gate row alike) or zipf (text-like frequencies)",
    )
    p.add_argument(
        "--gate-source",
        choices=["table", "embedding", "both"],
        default="both",
        help="egmla_fused's gate rows: precomputed table (egmla_fused), embedding (egmla_fused_emb)",
    )
    p.add_argument(
        "--fused-backend",
        choices=kernels.BACKENDS,
        default="auto",
        help="auto: Triton on CUDA, else the PyTorch reference algorithm (rows named *_reference)",
    )
    p.add_argument("--steps", type=int, default=50, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--no-graph", action="store_true", help="time eager steps instead of a CUDA graph replay")
    p.add_argument("--prefill-rows", type=int, default=8, help="sequences per prefill pass")
    p.add_argument("--prefill-chunk", type=int, default=1024, help="tokens per prefill forward")
    p.add_argument("--check-rows", type=int, default=8, help="sequences compared against the unfused path")
    p.add_argument(
        "--block-s", type=int, default=0, help="fused kernel: context tokens per tile (0: by gate source, 64 for both)"
    )
    p.add_argument("--split-tokens", type=int, default=0, help="fused kernel: tokens per split (0: heuristic)")
    p.add_argument(
        "--num-warps", type=int, default=0, help="fused kernel: warps per program (0: 4, for both gate sources)"
    )
    p.add_argument(
        "--num-stages",
        type=int,
        default=0,
        help="fused kernel: software pipeline stages (0: by gate source: 2 table, 1 embedding)",
    )
    p.add_argument(
        "--heads-per-program",
        type=int,
        default=0,
        help="fused kernel: adjacent heads one program serves, sharing its latent and gate-row loads "
        "(0: by gate source)",
    )
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="Hydra overrides for every variant")
    p.add_argument("--csv", type=Path, default=None, help="append rows to this CSV file")
    p.set_defaults(run=run)


def run(args) -> int:
    device = bench_device(args.size)
    if device is None:
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    launch = kernels.LaunchOptions(
        block_s=args.block_s or None,
        split_tokens=args.split_tokens or None,
        num_warps=args.num_warps or None,
        num_stages=args.num_stages or None,
        heads_per_program=args.heads_per_program or None,
    )
    rows: list[dict] = []
    stamp = bench_stamp()
    try:
        names = expand_variants(args.variants, args.gate_source)
        for variant in names:
            model, name = build(
                args.size, variant, max(args.context) + 1, args.set, device, dtype, args.fused_backend, launch
            )
            print(describe(model, name), flush=True)
            for context in args.context:
                batches = [args.batch]
                fits = max_batch_in_budget(model.cfg, context, args.budget_gib, model.embed.weight.element_size())
                if args.max_batch_run and min(fits, args.max_batch_run) not in (0, args.batch):
                    batches.append(min(fits, args.max_batch_run))
                for batch in batches:
                    try:
                        row = bench_row(model, name, args.size, context, batch, args, device, card)
                    except torch.cuda.OutOfMemoryError:
                        print(f"  {name}: OOM at batch {batch} (context {context})", flush=True)
                        continue
                    finally:
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    row |= stamp | {"at_max": batch != args.batch}
                    rows.append(row)
                    print(format_table([row]).splitlines()[-1], flush=True)
                    if args.csv:
                        append_csv(args.csv, [row], CSV_COLUMNS)
            del model
    except (ConfigError, ValueError, BenchError) as exc:
        print(f"egmla-bench: error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, BenchError) else 2
    if rows:
        print(f"\n{args.size}, {card}, timed batch {args.batch}, budget {args.budget_gib} GiB, {args.steps} steps\n")
        print(format_table(sorted(rows, key=lambda r: (r["at_max"], r["context"]))))
    return 0
