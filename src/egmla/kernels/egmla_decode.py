"""Fused EG-MLA decode in Triton (flash-decoding): expand, gate, normalise and attend without writing K/V.

Grid (head group, split, sequence), head groups fastest so the programs that share a latent tile run together
and find it in L2. A program serves HEADS adjacent heads (one tl.dot expands them all, and their gate columns
are one contiguous stretch of each gate row) and walks its split of the context in tiles of BLOCK_S tokens,
reading from memory only: the latent tile, the RoPE-key tile, the token ids and the gate's source rows
(per-vocabulary gate table rows, or embedding rows recomputed through W_ue on tensor cores). k_nope and v come
from tl.dot with W_uk^T and W_uv^T, are gated and normalised per head in fp32 registers and fold into an
online softmax per head; the softmax-weighted sum of the values is one more tl.dot. A second small kernel
merges the splits by their log-sum-exp. reference.py is the same algorithm in PyTorch.

Importing this module imports triton: egmla.kernels does so only when the Triton backend is asked for.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from . import check_heads_per_program
from .reference import DecodeWeights, split_layout

ACT = {"none": 0, "sigmoid": 1, "silu": 2}
NORM = {"none": 0, "layernorm": 1, "rmsnorm": 2}
UPCAST = os.environ.get("TRITON_INTERPRET") == "1"  # the CPU interpreter's bf16 tl.dot is wrong: fp32 there


def present_or(like: torch.Tensor, *tensors: torch.Tensor | None) -> list[torch.Tensor]:
    """The tensors, absent ones replaced by `like`: a kernel needs a pointer even for a parameter it never
    reads (a norm without bias, no norm at all)."""
    return [t if t is not None else like for t in tensors]


@triton.jit
def _activate(x, ACT_KIND: tl.constexpr):
    if ACT_KIND == 1:
        x = tl.sigmoid(x)
    elif ACT_KIND == 2:
        x = x * tl.sigmoid(x)
    return x


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation; UPCAST only for the CPU interpreter, whose bf16 tl.dot is wrong."""
    if UPCAST:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b)


@triton.jit
def _egmla_decode_split(
    QN, QR, LAT, KR, IDS, W_UKV, G, EMB, W_UE, KW, KB, VW, VB, O_SPLIT, LSE_SPLIT,
    S, split_tokens, n_split, scale, eps,
    s_qn_b, s_qn_h, s_qr_b, s_qr_h, s_lat_b, s_lat_s, s_kr_b, s_kr_s, s_ids_b, s_g_v, s_emb_v,
    H: tl.constexpr, DN: tl.constexpr, DV: tl.constexpr, DR: tl.constexpr, DC: tl.constexpr, GD: tl.constexpr,
    GATE_H: tl.constexpr, HEADS: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr, FROM_TABLE: tl.constexpr,
    IDS32: tl.constexpr, VALUES_FP16: tl.constexpr,
    SHARED: tl.constexpr, ACT_KIND: tl.constexpr, NORM_KIND: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(2).to(tl.int64)
    split = tl.program_id(1)
    first_head = tl.program_id(0) * HEADS
    heads = first_head + tl.arange(0, HEADS)  # this program's HEADS adjacent heads
    offs_s = tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, DC)
    offs_n = tl.arange(0, DN)
    offs_v = tl.arange(0, DV)
    offs_r = tl.arange(0, DR)
    # Flat column c of a [.., HEADS * D] tile is head c // D, dim c % D: one tl.dot expands every head at once.
    flat_n = tl.arange(0, HEADS * DN)
    flat_v = tl.arange(0, HEADS * DV)
    head_n = first_head + flat_n // DN
    head_v = first_head + flat_v // DV

    qn = tl.load(QN + b * s_qn_b + heads[:, None] * s_qn_h + offs_n[None, :]).to(tl.float32)  # [HEADS, DN]
    qr = tl.load(QR + b * s_qr_b + heads[:, None] * s_qr_h + offs_r[None, :]).to(tl.float32)  # [HEADS, DR]
    # W_uk^T [DC, HEADS * DN] and W_uv^T [DC, HEADS * DV] of these heads: W_ukv is [H, DN + DV, DC], row-major.
    wuk_t = tl.load(W_UKV + (head_n * (DN + DV) + flat_n % DN)[None, :] * DC + offs_c[:, None])
    wuv_t = tl.load(W_UKV + (head_v * (DN + DV) + DN + flat_v % DV)[None, :] * DC + offs_c[:, None])
    # The keys' norm folds into the score, with x = k_nope * g_k: q . LayerNorm(x) = rstd(x) * (sum(q w x) -
    # mean(x) * sum(q w)) + q . b, so no normalised key is formed; the values' affine folds into the output:
    # sum_t p_t LayerNorm(y_t) = w * sum_t p_t yhat_t + b * sum_t p_t.
    qk = qn
    if NORM_KIND != 0:
        qk = qn * tl.load(KW + offs_n).to(tl.float32)[None, :]
    qk_sum = tl.sum(qk, axis=1)  # [HEADS]
    qk_bias = tl.zeros([HEADS], dtype=tl.float32)
    if NORM_KIND == 1:
        qk_bias = tl.sum(qn * tl.load(KB + offs_n).to(tl.float32)[None, :], axis=1)
    # Gate columns of these heads in a gate row: head h's k gate at h * GATE_H, its v gate DN after (unless shared).
    gate_k = head_n * GATE_H + flat_n % DN
    gate_v = head_v * GATE_H + (1 - SHARED) * DN + flat_v % DV
    if FROM_TABLE == 0:  # W_ue^T slices [GD, HEADS * DN], [GD, HEADS * DV]: loaded once, reused by every tile
        offs_g = tl.arange(0, GD)
        w_ue_k = tl.load(W_UE + gate_k[None, :] * GD + offs_g[:, None])
        w_ue_v = tl.load(W_UE + gate_v[None, :] * GD + offs_g[:, None])

    m_i = tl.full([HEADS], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([HEADS], dtype=tl.float32)
    # The values' weighted sum runs on tensor cores, which need 16 rows: row r < HEADS of `acc` is head r's, in
    # that head's own DV columns (the other columns and rows are never read).
    rows = tl.arange(0, ROWS)
    own_row = rows[:, None] == tl.arange(0, HEADS)[None, :]  # [ROWS, HEADS]
    acc = tl.zeros([ROWS, HEADS * DV], dtype=tl.float32)
    start = split * split_tokens
    end = tl.minimum(start + split_tokens, S)
    tok_next = tl.load(IDS + b * s_ids_b + start + offs_s, mask=start + offs_s < end, other=0)
    for s0 in range(start, end, BLOCK_S):
        pos = s0 + offs_s
        valid = pos < end
        # The gate first, so its gather (or recompute) is in flight while the latent expands; this tile's ids were
        # loaded during the previous tile. Gate-table rows stay bf16 until multiplied (fewer registers).
        if IDS32:  # noqa: SIM108  (static)
            tok = tok_next.to(tl.int32)
        else:
            tok = tok_next.to(tl.int64)
        tok_next = tl.load(IDS + b * s_ids_b + pos + BLOCK_S, mask=pos + BLOCK_S < end, other=0)
        if FROM_TABLE:
            row = G + tok[:, None] * s_g_v
            g_k = tl.load(row + gate_k[None, :], mask=valid[:, None], other=0.0, eviction_policy="evict_first")
            if SHARED:  # noqa: SIM108  (a static branch: Triton resolves it at compile time)
                g_v = g_k
            else:
                g_v = tl.load(row + gate_v[None, :], mask=valid[:, None], other=0.0, eviction_policy="evict_first")
        else:
            e = tl.load(EMB + tok[:, None] * s_emb_v + offs_g[None, :], mask=valid[:, None], other=0.0)
            g_k = _activate(_dot(e, w_ue_k, UPCAST), ACT_KIND)
            if SHARED:  # noqa: SIM108
                g_v = g_k
            else:
                g_v = _activate(_dot(e, w_ue_v, UPCAST), ACT_KIND)
        # L2 hints: a gate-table row slice is this program's alone (evicted first); the latent and RoPE-key tiles
        # are read again by the programs of the other heads (kept last).
        c = tl.load(
            LAT + b * s_lat_b + pos[:, None] * s_lat_s + offs_c[None, :],
            mask=valid[:, None],
            other=0.0,
            eviction_policy="evict_last",
        )
        x = tl.reshape(_dot(c, wuk_t, UPCAST) * g_k, [BLOCK_S, HEADS, DN])  # gated k_nope of every head, fp32
        score = tl.sum(x * qk[None, :, :], axis=2)  # [BLOCK_S, HEADS]
        if NORM_KIND == 1:
            mean = tl.sum(x, axis=2) / DN
            rstd = tl.rsqrt(tl.maximum(tl.sum(x * x, axis=2) / DN - mean * mean, 0.0) + eps)
            score = rstd * (score - mean * qk_sum[None, :]) + qk_bias[None, :]
        elif NORM_KIND == 2:
            score = score * tl.rsqrt(tl.sum(x * x, axis=2) / DN + eps)
        k_r = tl.load(
            KR + b * s_kr_b + pos[:, None] * s_kr_s + offs_r[None, :],
            mask=valid[:, None],
            other=0.0,
            eviction_policy="evict_last",
        )
        score += tl.sum(k_r.to(tl.float32)[:, None, :] * qr[None, :, :], axis=2)
        score = tl.where(valid[:, None], score * scale, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(score, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(score - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p, axis=0)
        # The values only now, after the score: fewer registers live at once.
        y = tl.reshape(_dot(c, wuv_t, UPCAST) * g_v, [BLOCK_S, HEADS, DV])
        if NORM_KIND == 1:  # normalised before the affine (folded in at the end): O(1) values
            mean_v = tl.sum(y, axis=2) / DV
            y = y - mean_v[:, :, None]
            y = y * tl.rsqrt(tl.sum(y * y, axis=2) / DV + eps)[:, :, None]
        elif NORM_KIND == 2:
            y = y * tl.rsqrt(tl.sum(y * y, axis=2) / DV + eps)[:, :, None]
        # acc[r] += sum_t p[t, r] y[t] as one [ROWS, BLOCK_S] @ [BLOCK_S, HEADS * DV] product, fp32 out.
        a = tl.sum(tl.where(own_row[:, None, :], p[None, :, :], 0.0), axis=2)  # [ROWS, BLOCK_S]
        alpha_rows = tl.sum(tl.where(own_row, alpha[None, :], 0.0), axis=1)  # [ROWS]
        y = tl.reshape(y, [BLOCK_S, HEADS * DV])
        if VALUES_FP16:  # probabilities and normalised values: fp16 (3 more mantissa bits than bf16) is safe
            a, y = a.to(tl.float16), y.to(tl.float16)
        acc = acc * alpha_rows[:, None] + _dot(a, y, UPCAST)
        m_i = m_new

    acc = tl.sum(tl.where(own_row[:, :, None], tl.reshape(acc, [ROWS, HEADS, DV]), 0.0), axis=0)  # [HEADS, DV]
    o = acc / l_i[:, None]
    if NORM_KIND != 0:
        o = o * tl.load(VW + offs_v).to(tl.float32)[None, :]
    if NORM_KIND == 1:
        o += tl.load(VB + offs_v).to(tl.float32)[None, :]
    out = (b * H + heads) * n_split + split  # [HEADS]
    tl.store(O_SPLIT + out[:, None] * DV + offs_v[None, :], o)
    tl.store(LSE_SPLIT + out, m_i + tl.log(l_i))


@triton.jit
def _merge_splits(O_SPLIT, LSE_SPLIT, OUT, n_split, DV: tl.constexpr, BLOCK_SPLIT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one (sequence, head)
    offs = tl.arange(0, BLOCK_SPLIT)
    offs_v = tl.arange(0, DV)
    keep = offs < n_split
    lse = tl.load(LSE_SPLIT + row * n_split + offs, mask=keep, other=-float("inf"))
    weight = tl.exp(lse - tl.max(lse, axis=0))
    o = tl.load(O_SPLIT + (row * n_split + offs)[:, None] * DV + offs_v[None, :], mask=keep[:, None], other=0.0)
    out = tl.sum(o * weight[:, None], axis=0) / tl.sum(weight, axis=0)
    tl.store(OUT + row * DV + offs_v, out.to(OUT.dtype.element_ty))


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def default_split_tokens(batch: int, head_groups: int, s: int, block_s: int, device: torch.device,
                         cap: int = 2048) -> int:  # fmt: skip
    """Enough splits for about 4 programs per SM (a program per sequence, split and head group), never fewer than
    4 tiles nor more than `cap` tokens per split.

    The cap: 2048-token splits are as fast as longer ones at small batches and much faster than one split per
    sequence at large ones (experiments/decode/README.md, end of "The kernel's costs")."""
    splits = max(1, -(-4 * _sm_count(device) // (batch * head_groups)))
    return max(4 * block_s, min(cap, -(-s // splits)))


# Launch defaults per gate source, the fastest of the launch sweeps (figures in experiments/decode/README.md,
# "The kernel's costs, and what the restructure changed"): table rows in 64-token tiles on 4 warps, 2 stages
# (4 warps win only together with the L2 hints); the embedding in 64-token tiles on 4 warps, 1 stage, 512-token
# splits. One head per program: serving 2 or 4 was slower. LaunchOptions overrides any of them.
LAUNCH = {
    "table": {"block_s": 64, "num_warps": 4, "num_stages": 2, "split_cap": 2048, "heads_per_program": 1},
    "embedding": {"block_s": 64, "num_warps": 4, "num_stages": 1, "split_cap": 512, "heads_per_program": 1},
}


def decode_attention(q_nope, q_rope, latent, k_rope, ids, w: DecodeWeights, block_s: int | None = None,
                     split_tokens: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                     heads_per_program: int | None = None) -> torch.Tensor:  # fmt: skip
    """Attention output [B, H, d_v] of one new token per sequence; same arguments as reference.decode_attention.

    latent/k_rope/ids may be views of a longer cache (any batch and token strides; the last dim contiguous).
    block_s, split_tokens, num_warps, num_stages and heads_per_program (a power of two dividing H) default by
    gate source (LAUNCH).
    """
    b, h, dn = q_nope.shape
    s, dc = latent.shape[1], latent.shape[2]
    dv, dr = w.d_v, q_rope.shape[-1]
    q_nope, q_rope = q_nope.contiguous(), q_rope.contiguous()
    for name, t in (("latent", latent), ("k_rope", k_rope), ("ids", ids)):
        if t.stride(-1) != 1:
            raise ValueError(f"fused EG-MLA decode: {name} needs a contiguous last dimension")
    launch = LAUNCH["table" if w.gate_rows is not None else "embedding"]
    block_s = block_s or launch["block_s"]
    num_warps = num_warps or launch["num_warps"]
    num_stages = num_stages or launch["num_stages"]
    heads = heads_per_program or launch["heads_per_program"]
    check_heads_per_program(heads, h, f"fused EG-MLA decode: heads_per_program={heads}")
    split_tokens = split_tokens or default_split_tokens(b, h // heads, s, block_s, latent.device, launch["split_cap"])
    split, n_split = split_layout(s, block_s, split_tokens)
    o_split = torch.empty(b, h, n_split, dv, dtype=torch.float32, device=latent.device)
    lse_split = torch.empty(b, h, n_split, dtype=torch.float32, device=latent.device)
    out = torch.empty(b, h, dv, dtype=latent.dtype, device=latent.device)

    w_ukv = w.w_ukv.contiguous()
    from_table = w.gate_rows is not None
    g = w.gate_rows if from_table else w_ukv  # unused pointers still need a tensor
    emb, w_ue = (w_ukv, w_ukv) if from_table else (w.embedding, w.w_ue.contiguous())
    kw, kb, vw, vb = present_or(w_ukv, w.k_weight, w.k_bias, w.v_weight, w.v_bias)
    source = g if from_table else emb
    ids32 = source.shape[0] * source.stride(0) < 2**31  # row offsets fit int32: cheaper address arithmetic
    _egmla_decode_split[(h // heads, n_split, b)](
        q_nope, q_rope, latent, k_rope, ids, w_ukv, g, emb, w_ue, kw, kb, vw, vb, o_split, lse_split,
        s, split, n_split, w.scale, w.eps,
        q_nope.stride(0), q_nope.stride(1), q_rope.stride(0), q_rope.stride(1),
        latent.stride(0), latent.stride(1), k_rope.stride(0), k_rope.stride(1), ids.stride(0),
        g.stride(0), emb.stride(0),
        H=h, DN=dn, DV=dv, DR=dr, DC=dc, GD=1 if from_table else emb.shape[1],
        GATE_H=dn if w.shared else dn + dv, HEADS=heads, ROWS=max(16, heads), BLOCK_S=block_s,
        FROM_TABLE=from_table, IDS32=ids32, VALUES_FP16=latent.dtype != torch.float32 and w.norm != "none",
        SHARED=w.shared, ACT_KIND=ACT[w.activation], NORM_KIND=NORM[w.norm],
        UPCAST=UPCAST, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    _merge_splits[(b * h,)](
        o_split, lse_split, out, n_split, DV=dv, BLOCK_SPLIT=max(2, triton.next_power_of_2(n_split))
    )
    return out
