"""What each part of the fused EG-MLA decode kernel costs, and which changes make it faster, measured by editing
its source: ablations remove one part (wrong results by design), candidates change the code (same results).
Each edited kernel is timed alone on random inputs at one layer's shapes over a few launch settings, with its
relative error against the unedited kernel and its registers and spills per thread; MHA's SDPA on the same
shapes is the yardstick. Needs a GPU; TRITON_INTERPRET=1 runs a CPU smoke pass on a tiny model (no timings).

    python experiments/decode/kernel_costs.py --base fc328f7 --sweep ablations candidates
    python experiments/decode/kernel_costs.py --base fc328f7 --sweep combinations restructured
    python experiments/decode/kernel_costs.py --sweep launches --size 1.2b --batch 8 --sources embedding
    python experiments/decode/kernel_costs.py --base b7945e9 --sweep costs   # the restructured kernel's costs
    python experiments/decode/kernel_costs.py --base b7945e9 --sweep launches --sources embedding
    python experiments/decode/kernel_costs.py --sweep next    # the current kernel's costs and next candidates

--base: the git revision whose kernel is edited (default: the working tree's). The edits of the ablations,
candidates, combinations and restructured sweeps name lines of the kernel at fc328f7, the kernel before the
restructure of 522d6a9 that they chose; those of the costs sweep name lines of b7945e9's, the restructured
kernel before its L2 hints; those of the next sweep name lines of the working tree's; the launches sweep needs
no edit and times any revision. Results: experiments/decode/README.md, "The kernel's costs".
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from egmla.bench.timing import cuda_milliseconds
from egmla.config import build_model, compose
from egmla.kernels import enable_fused_decode

KERNEL = "src/egmla/kernels/egmla_decode.py"
I8 = " " * 8
TOK = I8 + "tok = tl.load(IDS + b * s_ids_b + pos, mask=valid, other=0).to(tl.int64)\n"
LOOP = "    for s0 in range(start, end, BLOCK_S):\n"
LATENT = (
    I8 + "c = tl.load(LAT + b * s_lat_b + pos[:, None] * s_lat_s + offs_c[None, :], mask=valid[:, None], other=0.0)\n"
)
V_DOT = I8 + "y = _dot(c, wuv_t, UPCAST)  # v [BLOCK_S, HEADS * DV] fp32\n"
V_GATE = I8 + "y = tl.reshape(y * g_v, [BLOCK_S, HEADS, DV])\n"
W_UKV = (
    "    wuk_t = tl.load(W_UKV + (head_n * (DN + DV) + flat_n % DN)[None, :] * DC + offs_c[:, None])\n"
    "    wuv_t = tl.load(W_UKV + (head_v * (DN + DV) + DN + flat_v % DV)[None, :] * DC + offs_c[:, None])\n"
)
W_UE = (
    I8
    + "w_ue_k = tl.load(W_UE + gate_k[None, :] * GD + offs_g[:, None])\n"
    + I8
    + "w_ue_v = tl.load(W_UE + gate_v[None, :] * GD + offs_g[:, None])\n"
)
PV = I8 + "acc = acc * alpha[:, None] + tl.sum(coef[:, :, None] * y, axis=0)\n"
ROPE_SCORE = "score += tl.sum(k_r.to(tl.float32)[:, None, :] * qr[None, :, :], axis=2)"


def replace(old: str, new: str):
    def edit(text: str) -> str:
        if old not in text:
            raise LookupError(f"no line {old.strip()[:70]!r}")
        return text.replace(old, new)

    return edit


IN_ORDER = replace("row = G + tok[:, None] * s_g_v", "row = G + pos[:, None].to(tl.int64) * s_g_v")  # no gather


def gate_first(text: str) -> str:
    """The ids load and the gate gather (or recompute) before the latent load and the expansion dots."""
    i, j = text.index(TOK), text.index(I8 + "x = tl.reshape(x * g_k")
    block, text = text[i:j], text[:i] + text[j:]
    return replace(LATENT, block + LATENT)(text)


def prefetch_ids(text: str) -> str:
    """The next tile's ids are loaded during this tile."""
    first = "    tok_nx = tl.load(IDS + b * s_ids_b + start + offs_s, mask=start + offs_s < end, other=0)\n"
    text = replace(LOOP, first + LOOP)(text)
    nxt = I8 + "tok_nx = tl.load(IDS + b * s_ids_b + pos + BLOCK_S, mask=pos + BLOCK_S < end, other=0)\n"
    return replace(TOK, I8 + "tok = tok_nx.to(tl.int64)\n" + nxt)(text)


def pipelined_gate(text: str) -> str:
    """Gate table, separate gates: the next tile's gate rows are gathered during this tile."""
    mask = "(start + offs_s < end)[:, None]"
    pre = (
        "    tok0 = tl.load(IDS + b * s_ids_b + start + offs_s, mask=start + offs_s < end, other=0).to(tl.int64)\n"
        f"    gk_nx = tl.load(G + tok0[:, None] * s_g_v + gate_k[None, :], mask={mask}, other=0.0)\n"
        f"    gv_nx = tl.load(G + tok0[:, None] * s_g_v + gate_v[None, :], mask={mask}, other=0.0)\n"
    )
    text = replace(LOOP, pre + LOOP)(text)
    old = (
        I8
        + "if FROM_TABLE:\n"
        + I8
        + "    row = G + tok[:, None] * s_g_v\n"
        + I8
        + "    g_k = tl.load(row + gate_k[None, :], mask=valid[:, None], other=0.0).to(tl.float32)\n"
    )
    new = (
        I8
        + "if FROM_TABLE:\n"
        + I8
        + "    g_k = gk_nx.to(tl.float32)\n"
        + I8
        + "    g_v0 = gv_nx.to(tl.float32)\n"
        + I8
        + "    nx = pos + BLOCK_S\n"
        + I8
        + "    ntok = tl.load(IDS + b * s_ids_b + nx, mask=nx < end, other=0).to(tl.int64)\n"
        + I8
        + "    gk_nx = tl.load(G + ntok[:, None] * s_g_v + gate_k[None, :], mask=(nx < end)[:, None], other=0.0)\n"
        + I8
        + "    gv_nx = tl.load(G + ntok[:, None] * s_g_v + gate_v[None, :], mask=(nx < end)[:, None], other=0.0)\n"
    )
    text = replace(old, new)(text)
    gv = I8 + "        g_v = tl.load(row + gate_v[None, :], mask=valid[:, None], other=0.0).to(tl.float32)\n"
    return replace(gv, I8 + "        g_v = g_v0\n")(text)


def late_values(text: str) -> str:
    """The value expansion and gating after the score: fewer registers live at once."""
    text = replace(V_GATE, "")(replace(V_DOT, "")(text))
    return replace(I8 + "coef = p\n", V_DOT + V_GATE + I8 + "coef = p\n")(text)


def bf16_gate_rows(text: str) -> str:
    """Gate-table rows stay bf16 until multiplied."""
    for name in ("k", "v"):
        old = f"g_{name} = tl.load(row + gate_{name}[None, :], mask=valid[:, None], other=0.0).to(tl.float32)"
        text = replace(old, old.replace(".to(tl.float32)", ""))(text)
    return text


def weights_per_tile(text: str) -> str:
    """W_uk^T and W_uv^T loaded in every tile (from L1/L2) instead of once."""
    return replace(LATENT, LATENT + W_UKV.replace("    w", I8 + "w"))(replace(W_UKV, "")(text))


def w_ue_per_tile(text: str) -> str:
    """Embedding source: the W_ue slices loaded in every tile instead of once."""
    emb = I8 + "    e = tl.load(EMB + tok[:, None] * s_emb_v + offs_g[None, :], mask=valid[:, None], other=0.0)\n"
    return replace(emb, emb + W_UE.replace(I8 + "w", I8 + "    w"))(replace(W_UE, "")(text))


def values_on_tensor_cores(text: str) -> str:
    """One head per program: the softmax-weighted sum of the centred values as a [16, BLOCK_S] @ [BLOCK_S, DV]
    product (row 0 real) with fp16 operands, instead of a reduction over the tile's tokens in registers."""
    text = replace(
        "    acc = tl.zeros([HEADS, DV], dtype=tl.float32)\n", "    acc16 = tl.zeros([16, DV], dtype=tl.float32)\n"
    )(text)
    coef16 = "tl.trans(tl.broadcast_to(coef, [BLOCK_S, 16]))"
    new = (
        I8
        + f"a16 = tl.where(tl.arange(0, 16)[:, None] == 0, {coef16}, 0.0).to(tl.float16)\n"
        + I8
        + "if NORM_KIND == 1:\n"
        + I8
        + "    y = y - mean_v[:, :, None]\n"
        + I8
        + "y16 = tl.reshape(y, [BLOCK_S, HEADS * DV]).to(tl.float16)\n"
        + I8
        + "acc16 = acc16 * alpha[:, None] + _dot(a16, y16, UPCAST)\n"
    )
    text = replace(PV, new)(text)
    text = replace("            shift = shift * alpha + tl.sum(coef * mean_v, axis=0)\n", "")(text)
    return replace(
        "    o = acc / l_i[:, None]\n", "    acc = tl.sum(acc16, axis=0)[None, :]\n    o = acc / l_i[:, None]\n"
    )(text)


def int32_ids(text: str) -> str:
    """Row offsets in int32 (after prefetch_ids; they fit for these tables)."""
    return replace(I8 + "tok = tok_nx.to(tl.int64)\n", I8 + "tok = tok_nx.to(tl.int32)\n")(text)


def ablations(prefix: str, base: list) -> dict:
    no_gate = [
        replace("x = tl.reshape(x * g_k,", "x = tl.reshape(x,"),
        replace("y = tl.reshape(y * g_v,", "y = tl.reshape(y,"),
    ]
    no_dots = [
        replace("x = _dot(c, wuk_t, UPCAST)", "x = c.to(tl.float32)"),
        replace("y = _dot(c, wuv_t, UPCAST)", "y = c.to(tl.float32)"),
    ]
    return {
        f"{prefix}no gate (no gate loads, no products)": base + no_gate,
        f"{prefix}no expansion dots (x = y = latent)": base + no_dots,
        f"{prefix}no LayerNorm folding": base + [replace("NORM_KIND=NORM[w.norm]", "NORM_KIND=0")],
        f"{prefix}no RoPE key": base + [replace(ROPE_SCORE, "")],
        f"{prefix}no value accumulation": base + [replace(PV, I8 + "acc = acc * alpha[:, None]\n")],
        f"{prefix}gate rows read in order (no random gather)": base + [IN_ORDER],
    }


def restructured_ablations() -> dict:
    """Ablations of the restructured kernel (522d6a9 onwards), with the gate sources each applies to."""
    x, y = "_dot(c, wuk_t, UPCAST)", "_dot(c, wuv_t, UPCAST)"
    pv = "acc = acc * alpha_rows[:, None] + _dot(a, y, UPCAST)"
    edits = {
        "ablation: no gate (no gate loads, no products)": [replace(f"{x} * g_k", x), replace(f"{y} * g_v", y)],
        "ablation: no expansion dots (x = y = latent)": [
            replace(x, "c.to(tl.float32)"),
            replace(y, "c.to(tl.float32)"),
        ],
        "ablation: no LayerNorm folding": [replace("NORM_KIND=NORM[w.norm]", "NORM_KIND=0")],
        "ablation: no RoPE key": [replace(ROPE_SCORE, "")],
        "ablation: no value accumulation": [replace(pv, "acc = acc * alpha_rows[:, None]")],
        "ablation: gate rows read in order (no random gather)": [IN_ORDER],
    }
    return {name: (edit, TABLE if "gate rows" in name else BOTH) for name, edit in edits.items()}


def rope_on_tensor_cores(text: str) -> str:
    """The RoPE part of the score as a [BLOCK_S, DR] @ [DR, ROWS] product (column r: head r's) instead of
    products and a row sum in registers: its result lands in the dot layout, as the rest of the score."""
    qr_t = (
        "    qr_t = tl.trans(tl.sum(tl.where(own_row[:, :, None], qr[None, :, :], 0.0), axis=1))"
        ".to(QR.dtype.element_ty)  # [DR, ROWS]\n"
    )
    text = replace(
        "    acc = tl.zeros([ROWS, HEADS * DV], dtype=tl.float32)\n",
        qr_t + "    acc = tl.zeros([ROWS, HEADS * DV], dtype=tl.float32)\n",
    )(text)
    rope = I8 + ROPE_SCORE + "\n"
    new = I8 + "score += tl.sum(tl.where(own_row[None, :, :], _dot(k_r, qr_t, UPCAST)[:, :, None], 0.0), axis=1)\n"
    return replace(rope, new)(text)


def cache_hints(text: str) -> str:
    """Gate-table rows (read once) evicted first; the latent and RoPE-key tiles (read by every head's program)
    kept last in L2."""
    for name in ("k", "v"):
        old = f"g_{name} = tl.load(row + gate_{name}[None, :], mask=valid[:, None], other=0.0)"
        text = replace(old, old[:-1] + ', eviction_policy="evict_first")')(text)
    for old in ("offs_c[None, :], mask=valid[:, None], other=0.0)", "offs_r[None, :], mask=valid[:, None], other=0.0)"):
        text = replace(old, old[:-1] + ', eviction_policy="evict_last")')(text)
    return text


def embedding_rows_kept(text: str) -> str:
    """Embedding rows kept last in L2: unlike a gate-table row slice, every head's program reads the whole row."""
    old = "e = tl.load(EMB + tok[:, None] * s_emb_v + offs_g[None, :], mask=valid[:, None], other=0.0)"
    return replace(old, old[:-1] + ', eviction_policy="evict_last")')(text)


NO_TILE_HINTS = replace('    eviction_policy="evict_last",\n', "")  # the latent's and the RoPE key's
NO_ROW_HINTS = replace(', eviction_policy="evict_first")', ")")  # the gate-table rows'

BOTH, TABLE, EMBEDDING = ("table", "embedding"), ("table",), ("embedding",)
RESTRUCTURED = [gate_first, prefetch_ids, late_values, bf16_gate_rows]  # the table winner of "combinations"
RESTRUCTURED_EMB = [gate_first, prefetch_ids, late_values]
# Launch settings (tile tokens, warps, pipeline stages, tokens per split or None: the kernel's heuristic).
LAUNCHES = {
    "candidates": {
        "table": [(64, 2, 2, None), (32, 2, 2, None), (64, 4, 2, None), (128, 4, 2, None), (64, 2, 2, 1024),
                  (64, 2, 2, 512)],
        "embedding": [(32, 2, 2, None), (64, 4, 2, None), (128, 4, 2, None), (64, 8, 2, None), (32, 2, 2, 256)],
    },
    "combinations": {
        "table": [(64, 2, 2, None), (32, 2, 2, None), (64, 4, 2, None), (128, 4, 2, None), (128, 8, 2, None),
                  (64, 2, 3, None), (64, 4, 3, None), (32, 2, 3, None), (64, 4, 1, None), (64, 2, 1, None)],
        "embedding": [(32, 2, 2, None), (32, 4, 2, None), (64, 4, 2, None), (32, 2, 3, None), (32, 2, 1, None),
                      (64, 4, 1, None)],
    },
    "restructured": {
        "table": [(64, 2, 2, None), (64, 2, 1, None), (128, 4, 2, None), (64, 4, 2, None), (32, 2, 2, None)],
        "embedding": [(32, 2, 2, None), (64, 4, 1, None), (64, 4, 2, None), (32, 4, 2, None)],
    },
    "costs": {
        "table": [(64, 2, 2, None), (64, 4, 2, None), (128, 4, 2, None), (32, 2, 2, None)],
        "embedding": [(64, 4, 1, None), (64, 4, 2, None), (32, 2, 2, None)],
    },
    "next": {"table": [(64, 4, 2, None), (64, 2, 2, None)], "embedding": [(64, 4, 1, None), (64, 4, 2, None)]},
    "launches": {
        "table": [(64, 4, 2, None), (64, 4, 1, None), (64, 4, 3, None), (64, 2, 2, None), (32, 4, 2, None),
                  (128, 8, 2, None), (64, 8, 2, None), (128, 4, 2, None)],
        "embedding": [(64, 4, 1, None), (64, 4, 2, None), (32, 2, 2, None), (32, 4, 1, None), (64, 8, 1, None),
                      (128, 8, 1, None), (64, 2, 1, None)],
    },
}  # fmt: skip
SWEEPS = {  # sweep: {label: (edits, gate sources)}; ablations run at the first launch setting only
    "ablations": {name: (edits, BOTH) for name, edits in ablations("ablation: ", []).items()},
    "candidates": {
        "gate first": ([gate_first], BOTH),
        "prefetch ids": ([prefetch_ids], BOTH),
        "gate first + prefetch ids": ([gate_first, prefetch_ids], BOTH),
        "pipelined gate gather": ([pipelined_gate], TABLE),
        "late values": ([late_values], BOTH),
        "gate first + late values": ([gate_first, late_values], BOTH),
        "weights per tile": ([weights_per_tile], BOTH),
        "W_ue per tile": ([w_ue_per_tile], EMBEDDING),
        "W_ue + weights per tile": ([w_ue_per_tile, weights_per_tile], EMBEDDING),
    },
    "combinations": {
        "GF": ([gate_first], BOTH),
        "GF+PI": ([gate_first, prefetch_ids], BOTH),
        "GF+LV": ([gate_first, late_values], BOTH),
        "GF+PI+LV": ([gate_first, prefetch_ids, late_values], BOTH),
        "GF+PI+LV+G16": (RESTRUCTURED, TABLE),
        "GF+LV+G16": ([gate_first, late_values, bf16_gate_rows], TABLE),
        "G16": ([bf16_gate_rows], TABLE),
    },
    "restructured": {
        **{name: (edits, TABLE) for name, edits in ablations("W, ablation: ", RESTRUCTURED).items()},
        "W": (RESTRUCTURED, TABLE),
        "W+PVD": (RESTRUCTURED + [values_on_tensor_cores], TABLE),
        "W+I32": (RESTRUCTURED + [int32_ids], TABLE),
        "W+PVD+I32": (RESTRUCTURED + [values_on_tensor_cores, int32_ids], TABLE),
        "W+weights per tile": (RESTRUCTURED + [weights_per_tile], TABLE),
        "WE": (RESTRUCTURED_EMB, EMBEDDING),
        "WE+PVD": (RESTRUCTURED_EMB + [values_on_tensor_cores], EMBEDDING),
        "WE+PVD+I32": (RESTRUCTURED_EMB + [values_on_tensor_cores, int32_ids], EMBEDDING),
        "WE+W_ue per tile": (RESTRUCTURED_EMB + [w_ue_per_tile], EMBEDDING),
    },
    "launches": {"unedited": ([], BOTH)},
    # on the restructured kernel (b7945e9): what each part costs, and two candidates (the hints were adopted)
    "costs": {
        **restructured_ablations(),
        "RoPE score on tensor cores": ([rope_on_tensor_cores], BOTH),
        "L2 eviction hints": ([cache_hints], TABLE),
        "RoPE score on tensor cores + L2 eviction hints": ([rope_on_tensor_cores, cache_hints], TABLE),
    },
    # on the working tree's kernel (5bb89cf onwards, with the L2 hints): what each part costs, and candidates
    "next": {
        **restructured_ablations(),
        "ablation: no L2 hints on the latent and RoPE-key tiles": ([NO_TILE_HINTS], BOTH),
        "ablation: no L2 hint on the gate-table rows": ([NO_ROW_HINTS], TABLE),
        "embedding rows kept in L2": ([embedding_rows_kept], EMBEDDING),
    },
}
# Labels: GF gate first, PI prefetch ids, LV late values, G16 bf16 gate rows, W = GF+PI+LV+G16 (WE without G16),
# PVD values on tensor cores, I32 int32 row offsets.


def kernel_source(base: str | None) -> str:
    root = Path(__file__).resolve().parents[2]
    if base is None:
        text = (root / KERNEL).read_text()
    else:
        text = subprocess.run(
            ["git", "show", f"{base}:{KERNEL}"], cwd=root, check=True, capture_output=True, text=True
        ).stdout
    text = text.replace("from . import check_heads_per_program", "from egmla.kernels import check_heads_per_program")
    text = text.replace("from .reference import", "from egmla.kernels.reference import")
    # keep the launched kernel, for its registers and spills
    return text.replace(
        "    _egmla_decode_split[(h // heads", "    global LAUNCHED\n    LAUNCHED = _egmla_decode_split[(h // heads"
    )


class Timer:
    def __init__(self, batch: int, interpret: bool):
        self.batch, self.interpret = batch, interpret

    def __call__(self, fn, n: int = 20):
        """(us per sequence, output) of fn; nan under the interpreter."""
        out = fn()
        if self.interpret:
            return float("nan"), out
        return cuda_milliseconds(fn, n) * 1000 / self.batch, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", nargs="+", default=["launches"], choices=list(SWEEPS))
    parser.add_argument("--base", default=None, help="git revision of the kernel to edit (default: working tree)")
    parser.add_argument("--size", default=None, help="model size (default 120m; tiny under the interpreter)")
    parser.add_argument("--batch", type=int, default=None, help="sequences (default 32; 2 under the interpreter)")
    parser.add_argument("--context", type=int, default=None, help="tokens (default 16384; 256 interpreted)")
    parser.add_argument("--sources", nargs="+", default=list(BOTH), choices=BOTH)
    args = parser.parse_args()
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    size = args.size or ("tiny" if interpret else "120m")
    b = args.batch or (2 if interpret else 32)
    s = args.context or (256 if interpret else 16384)
    device = torch.device("cpu" if interpret else "cuda")
    dtype = torch.float32 if interpret else torch.bfloat16
    small = ["attention.kv_lora_rank=32", "attention.gate_dim=32"] if interpret else []
    cfg = compose([f"model={size}", "attention=egmla", *small])
    model = build_model(cfg).to(device, dtype).eval()
    timer = Timer(b, interpret)
    h = cfg.model.n_heads
    if not interpret:
        q = torch.randn(b, h, 1, 64, device=device, dtype=dtype)
        k, v = (torch.randn(b, h, s, 64, device=device, dtype=dtype) for _ in range(2))
        mha, _ = timer(lambda: F.scaled_dot_product_attention(q, k, v))
        print(f"{size}, batch {b}, context {s}: MHA SDPA alone {mha:.2f} us per sequence-layer", flush=True)
        del q, k, v
    base_text = kernel_source(args.base)
    workdir = Path(tempfile.mkdtemp(prefix="kernel_costs_"))
    modules = 0

    def load(text: str):
        nonlocal modules
        modules += 1
        path = workdir / f"kernel_{modules}.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    for source in args.sources:
        enable_fused_decode(model, source, "triton")
        attn = model.blocks[0].attn
        w = attn.fused_weights
        g = torch.Generator(device).manual_seed(0)
        randn = functools.partial(torch.randn, device=device, dtype=dtype, generator=g)
        q_nope, q_rope = randn(b, h, attn.d_nope), randn(b, h, attn.d_rope)
        latent, k_rope = randn(b, s, attn.d_c), randn(b, s, attn.d_rope)
        ids = torch.randint(0, cfg.model.vocab_size, (b, s), device=device, generator=g)
        inputs = (q_nope, q_rope, latent, k_rope, ids, w)
        us, reference = timer(functools.partial(load(base_text).decode_attention, *inputs))
        reference = reference.float()
        print(f"\n== gate {source}: the unedited kernel at its defaults {us:.2f} us", flush=True)
        for sweep in args.sweep:
            for label, (edits, sources) in SWEEPS[sweep].items():
                if source not in sources:
                    continue
                launches = LAUNCHES.get(sweep, LAUNCHES["launches"])[source]
                if "ablation" in label:
                    launches = launches[:1]
                text = base_text
                try:
                    for edit in edits:
                        text = edit(text)
                    module = load(text)
                except (LookupError, ValueError, SyntaxError) as exc:
                    print(f"  {label}: edit does not apply to this kernel ({exc})", flush=True)
                    continue
                for block_s, warps, stages, split in launches:
                    if interpret and block_s > 64:
                        continue
                    launch = dict(block_s=block_s, num_warps=warps, num_stages=stages, split_tokens=split)
                    try:
                        us, out = timer(functools.partial(module.decode_attention, *inputs, **launch))
                    except Exception as exc:  # a launch that does not fit (shared memory) is a result too
                        why = f"{type(exc).__name__} {str(exc)[:100]}"
                        print(f"  {source:9s} fails at tile {block_s}, {warps} warps: {why}", flush=True)
                        continue
                    error = ((out.float() - reference).norm() / reference.norm()).item()
                    kernel = getattr(module, "LAUNCHED", None)
                    regs = f"{getattr(kernel, 'n_regs', '-')} regs, {getattr(kernel, 'n_spills', '-')} spills"
                    split_label = split or "auto"
                    setting = f"tile {block_s:3d}, {warps} warps, {stages} stages, split {split_label:>4}"
                    print(f"  {source:9s} {us:8.2f} us  err {error:.1e}  {setting}  {regs:18s}  {label}", flush=True)


if __name__ == "__main__":
    main()
