"""EG-MLA's gated K/V expansion for training in Triton: k = [Norm(W_uk c * g_k), k_rope], v = Norm(W_uv c * g_v)
with g = act(W_ue e), per head, in one kernel that writes only k and v (the expanded K/V and the gate never
reach memory before the norm). The backward recomputes the expansion and the gate from c and e, and writes
the gradients of the expansion and of the gate's pre-activation; the four weight and input gradients are
then plain matmuls (cuBLAS). The same function in PyTorch is LatentAttention.expand.

Importing this module imports triton: LatentAttention does so only with attention.fused_expand=true.
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .egmla_decode import ACT, NORM, UPCAST, _activate, _dot, present_or

BLOCK_N = 64  # tokens per program


@triton.jit
def _normalise(x, w_ptr, b_ptr, offs, D: tl.constexpr, NORM_KIND: tl.constexpr, eps):
    """(normalised x, xhat, rstd) of rows x [BLOCK, D] in fp32: LayerNorm, RMSNorm or nothing."""
    if NORM_KIND == 1:
        mean = tl.sum(x, axis=1) / D
        xc = x - mean[:, None]
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / D + eps)
        xhat = xc * rstd[:, None]
        out = xhat * tl.load(w_ptr + offs).to(tl.float32)[None, :] + tl.load(b_ptr + offs).to(tl.float32)[None, :]
    elif NORM_KIND == 2:
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        xhat = x * rstd[:, None]
        out = xhat * tl.load(w_ptr + offs).to(tl.float32)[None, :]
    else:
        rstd = tl.full([x.shape[0]], 1.0, tl.float32)
        xhat = x
        out = x
    return out, xhat, rstd


@triton.jit
def _normalise_backward(dout, xhat, rstd, w_ptr, offs, D: tl.constexpr, NORM_KIND: tl.constexpr):
    """Gradient of the norm's input from the gradient of its output (fp32 rows)."""
    if NORM_KIND == 0:
        return dout
    dxhat = dout * tl.load(w_ptr + offs).to(tl.float32)[None, :]
    dot = tl.sum(dxhat * xhat, axis=1)[:, None] / D
    if NORM_KIND == 1:
        return rstd[:, None] * (dxhat - tl.sum(dxhat, axis=1)[:, None] / D - xhat * dot)
    return rstd[:, None] * (dxhat - xhat * dot)


@triton.jit
def _activation_grad(z, ACT_KIND: tl.constexpr):
    """d act(z) / dz."""
    if ACT_KIND == 1:
        s = tl.sigmoid(z)
        return s * (1.0 - s)
    elif ACT_KIND == 2:
        s = tl.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    return tl.full(z.shape, 1.0, tl.float32)


@triton.jit
def _gated_expand_fwd(
    LAT, EMB, KR, W_UKV, W_UE, KW, KB, VW, VB, K, V, N, eps,
    s_lat, s_emb, s_kr, s_k_n, s_k_h, s_v_n, s_v_h,
    H: tl.constexpr, DN: tl.constexpr, DV: tl.constexpr, DR: tl.constexpr, DC: tl.constexpr, GD: tl.constexpr,
    SHARED: tl.constexpr, ACT_KIND: tl.constexpr, NORM_KIND: tl.constexpr, BLOCK: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(0) % H  # heads fastest: the programs of one tile run together and share its rows in L2
    rows = (tl.program_id(0) // H).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = (rows < N)[:, None]
    offs_c, offs_g = tl.arange(0, DC), tl.arange(0, GD)
    offs_n, offs_v, offs_r = tl.arange(0, DN), tl.arange(0, DV), tl.arange(0, DR)
    gate_h = DN if SHARED else DN + DV  # gate columns per head
    c = tl.load(LAT + rows[:, None] * s_lat + offs_c[None, :], mask=valid, other=0.0)
    e = tl.load(EMB + rows[:, None] * s_emb + offs_g[None, :], mask=valid, other=0.0)
    # Weights transposed as dot operands: W_ukv rows h*(DN+DV) + [0, DN) are W_uk of head h, then W_uv.
    w_uk = tl.load(W_UKV + (h * (DN + DV) + offs_n)[None, :] * DC + offs_c[:, None])
    w_ue_k = tl.load(W_UE + (h * gate_h + offs_n)[None, :] * GD + offs_g[:, None])
    g_k = _activate(_dot(e, w_ue_k, UPCAST), ACT_KIND)
    k, _, _ = _normalise(_dot(c, w_uk, UPCAST) * g_k, KW, KB, offs_n, DN, NORM_KIND, eps)
    k_ptr = K + rows[:, None] * s_k_n + h * s_k_h
    tl.store(k_ptr + offs_n[None, :], k.to(K.dtype.element_ty), mask=valid)
    k_rope = tl.load(KR + rows[:, None] * s_kr + offs_r[None, :], mask=valid, other=0.0)
    tl.store(k_ptr + DN + offs_r[None, :], k_rope.to(K.dtype.element_ty), mask=valid)

    w_uv = tl.load(W_UKV + (h * (DN + DV) + DN + offs_v)[None, :] * DC + offs_c[:, None])
    if SHARED:  # noqa: SIM108  (static)
        g_v = g_k
    else:
        w_ue_v = tl.load(W_UE + (h * gate_h + DN + offs_v)[None, :] * GD + offs_g[:, None])
        g_v = _activate(_dot(e, w_ue_v, UPCAST), ACT_KIND)
    v, _, _ = _normalise(_dot(c, w_uv, UPCAST) * g_v, VW, VB, offs_v, DV, NORM_KIND, eps)
    tl.store(V + rows[:, None] * s_v_n + h * s_v_h + offs_v[None, :], v.to(V.dtype.element_ty), mask=valid)


@triton.jit
def _gated_expand_bwd(
    LAT, EMB, W_UKV, W_UE, KW, KB, VW, VB, DK, DV_, D_KV, D_G, D_NORM, N, eps,
    s_lat, s_emb, s_dk_n, s_dk_h, s_dv_n, s_dv_h,
    H: tl.constexpr, DN: tl.constexpr, DV: tl.constexpr, DC: tl.constexpr, GD: tl.constexpr,
    SHARED: tl.constexpr, ACT_KIND: tl.constexpr, NORM_KIND: tl.constexpr, BLOCK: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(0) % H  # heads fastest, as in the forward
    tile = tl.program_id(0) // H
    rows = tile.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = (rows < N)[:, None]
    offs_c, offs_g = tl.arange(0, DC), tl.arange(0, GD)
    offs_n, offs_v = tl.arange(0, DN), tl.arange(0, DV)
    gate_h = DN if SHARED else DN + DV
    c = tl.load(LAT + rows[:, None] * s_lat + offs_c[None, :], mask=valid, other=0.0)
    e = tl.load(EMB + rows[:, None] * s_emb + offs_g[None, :], mask=valid, other=0.0)
    w_uk = tl.load(W_UKV + (h * (DN + DV) + offs_n)[None, :] * DC + offs_c[:, None])
    w_ue_k = tl.load(W_UE + (h * gate_h + offs_n)[None, :] * GD + offs_g[:, None])
    z_k = _dot(e, w_ue_k, UPCAST)
    g_k = _activate(z_k, ACT_KIND)
    x = _dot(c, w_uk, UPCAST)
    _, xhat, rstd = _normalise(x * g_k, KW, KB, offs_n, DN, NORM_KIND, eps)
    dout = tl.load(DK + rows[:, None] * s_dk_n + h * s_dk_h + offs_n[None, :], mask=valid, other=0.0).to(tl.float32)
    dxg = _normalise_backward(dout, xhat, rstd, KW, offs_n, DN, NORM_KIND)
    d_kv_ptr = D_KV + rows[:, None] * (H * (DN + DV)) + h * (DN + DV)
    tl.store(d_kv_ptr + offs_n[None, :], (dxg * g_k).to(D_KV.dtype.element_ty), mask=valid)
    dz_k = dxg * x * _activation_grad(z_k, ACT_KIND)
    # Norm weight and bias gradients of this tile and head: summed over programs afterwards.
    norm_ptr = D_NORM + (tile * H + h) * (2 * DN + 2 * DV)
    tl.store(norm_ptr + offs_n, tl.sum(dout * xhat, axis=0))
    tl.store(norm_ptr + DN + offs_n, tl.sum(dout, axis=0))

    w_uv = tl.load(W_UKV + (h * (DN + DV) + DN + offs_v)[None, :] * DC + offs_c[:, None])
    if SHARED:
        z_v = z_k
        g_v = g_k
    else:
        w_ue_v = tl.load(W_UE + (h * gate_h + DN + offs_v)[None, :] * GD + offs_g[:, None])
        z_v = _dot(e, w_ue_v, UPCAST)
        g_v = _activate(z_v, ACT_KIND)
    y = _dot(c, w_uv, UPCAST)
    _, yhat, rstd_v = _normalise(y * g_v, VW, VB, offs_v, DV, NORM_KIND, eps)
    dout_v = tl.load(DV_ + rows[:, None] * s_dv_n + h * s_dv_h + offs_v[None, :], mask=valid, other=0.0)
    dout_v = dout_v.to(tl.float32)
    dyg = _normalise_backward(dout_v, yhat, rstd_v, VW, offs_v, DV, NORM_KIND)
    tl.store(d_kv_ptr + DN + offs_v[None, :], (dyg * g_v).to(D_KV.dtype.element_ty), mask=valid)
    dz_v = dyg * y * _activation_grad(z_v, ACT_KIND)
    tl.store(norm_ptr + 2 * DN + offs_v, tl.sum(dout_v * yhat, axis=0))
    tl.store(norm_ptr + 2 * DN + DV + offs_v, tl.sum(dout_v, axis=0))
    d_g_ptr = D_G + rows[:, None] * (H * gate_h) + h * gate_h
    if SHARED:
        tl.store(d_g_ptr + offs_n[None, :], (dz_k + dz_v).to(D_G.dtype.element_ty), mask=valid)
    else:
        tl.store(d_g_ptr + offs_n[None, :], dz_k.to(D_G.dtype.element_ty), mask=valid)
        tl.store(d_g_ptr + DN + offs_v[None, :], dz_v.to(D_G.dtype.element_ty), mask=valid)


def launch_forward(
    latent, emb, k_rope, w_ukv, w_ue, k_weight, k_bias, v_weight, v_bias, n_heads, d_nope, shared, activation, norm,
    eps, block: int = BLOCK_N, **launch,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The forward kernel's launch, as gated_expand makes it (`block` tokens per program; `launch`: Triton's
    num_warps / num_stages, its defaults when absent): what the op runs and what a launch sweep varies."""
    n, dc = latent.shape
    dv = w_ukv.shape[0] // n_heads - d_nope
    dr = k_rope.shape[1]
    k = torch.empty(n, n_heads, d_nope + dr, dtype=latent.dtype, device=latent.device)
    v = torch.empty(n, n_heads, dv, dtype=latent.dtype, device=latent.device)
    kw, kb, vw, vb = present_or(w_ukv, k_weight, k_bias, v_weight, v_bias)
    wrap_triton(_gated_expand_fwd)[(n_heads * triton.cdiv(n, block),)](
        latent, emb, k_rope, w_ukv, w_ue, kw, kb, vw, vb, k, v, n, eps,
        latent.stride(0), emb.stride(0), k_rope.stride(0), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        H=n_heads, DN=d_nope, DV=dv, DR=dr, DC=dc, GD=emb.shape[1], SHARED=shared, ACT_KIND=ACT[activation],
        NORM_KIND=NORM[norm], BLOCK=block, UPCAST=UPCAST, **launch,
    )  # fmt: skip
    return k, v


def launch_backward(
    dk, dv, latent, emb, w_ukv, w_ue, k_weight, k_bias, v_weight, v_bias, n_heads, d_nope, shared, activation, norm,
    eps, block: int = BLOCK_N, **launch,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The backward kernel's launch, as gated_expand_backward makes it (same `block` and `launch` as above)."""
    n, dc = latent.shape
    d_v = w_ukv.shape[0] // n_heads - d_nope
    tiles = triton.cdiv(n, block)
    d_kv = torch.empty(n, w_ukv.shape[0], dtype=latent.dtype, device=latent.device)
    d_g = torch.empty(n, w_ue.shape[0], dtype=latent.dtype, device=latent.device)
    d_norm = torch.empty(tiles * n_heads, 2 * d_nope + 2 * d_v, dtype=torch.float32, device=latent.device)
    kw, kb, vw, vb = present_or(w_ukv, k_weight, k_bias, v_weight, v_bias)
    wrap_triton(_gated_expand_bwd)[(n_heads * tiles,)](
        latent, emb, w_ukv, w_ue, kw, kb, vw, vb, dk, dv, d_kv, d_g, d_norm, n, eps,
        latent.stride(0), emb.stride(0), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        H=n_heads, DN=d_nope, DV=d_v, DC=dc, GD=emb.shape[1], SHARED=shared, ACT_KIND=ACT[activation],
        NORM_KIND=NORM[norm], BLOCK=block, UPCAST=UPCAST, **launch,
    )  # fmt: skip
    return d_kv, d_g, d_norm


@triton_op("egmla::gated_expand", mutates_args={})
def gated_expand(
    latent: torch.Tensor, emb: torch.Tensor, k_rope: torch.Tensor, w_ukv: torch.Tensor, w_ue: torch.Tensor,
    k_weight: torch.Tensor | None, k_bias: torch.Tensor | None, v_weight: torch.Tensor | None,
    v_bias: torch.Tensor | None, n_heads: int, d_nope: int, shared: bool, activation: str, norm: str, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """k [N, H, d_nope + d_rope], v [N, H, d_v] from latent [N, d_c], gate embedding rows emb [N, gate_dim],
    the (rotated) RoPE key [N, d_rope], W_ukv [H * (d_nope + d_v), d_c] and W_ue [gate width, gate_dim]."""
    return launch_forward(latent, emb, k_rope, w_ukv, w_ue, k_weight, k_bias, v_weight, v_bias, n_heads, d_nope,
                          shared, activation, norm, eps)  # fmt: skip


@triton_op("egmla::gated_expand_backward", mutates_args={})
def gated_expand_backward(
    dk: torch.Tensor, dv: torch.Tensor, latent: torch.Tensor, emb: torch.Tensor, w_ukv: torch.Tensor,
    w_ue: torch.Tensor, k_weight: torch.Tensor | None, k_bias: torch.Tensor | None, v_weight: torch.Tensor | None,
    v_bias: torch.Tensor | None, n_heads: int, d_nope: int, shared: bool, activation: str, norm: str, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(d of W_ukv c [N, H * (d_nope + d_v)], d of W_ue e before the activation [N, gate width], norm parameter
    gradients per tile and head [tiles * H, 2 d_nope + 2 d_v] in fp32: weight_k, bias_k, weight_v, bias_v)."""
    return launch_backward(dk, dv, latent, emb, w_ukv, w_ue, k_weight, k_bias, v_weight, v_bias, n_heads, d_nope,
                           shared, activation, norm, eps)  # fmt: skip


def _setup_context(ctx, inputs, output):
    latent, emb, _, w_ukv, w_ue, k_weight, k_bias, v_weight, v_bias, *options = inputs
    ctx.save_for_backward(latent, emb, w_ukv, w_ue, k_weight, k_bias, v_weight, v_bias)
    ctx.options = options


def _backward(ctx, dk, dv):
    latent, emb, w_ukv, w_ue, k_weight, k_bias, v_weight, v_bias = ctx.saved_tensors
    d_nope = ctx.options[1]
    d_v = dv.shape[-1]
    dk, dv = (t if t.stride(-1) == 1 else t.contiguous() for t in (dk, dv))
    dk_nope = dk[..., :d_nope]
    d_kv, d_g, d_norm = gated_expand_backward(
        dk_nope, dv, latent, emb, w_ukv, w_ue, k_weight, k_bias, v_weight, v_bias, *ctx.options
    )
    d_norm = d_norm.sum(0)
    dkw, dkb, dvw, dvb = d_norm.split([d_nope, d_nope, d_v, d_v])
    params = (k_weight, k_bias, v_weight, v_bias)
    grads_norm = [g.to(p.dtype) if p is not None else None for g, p in zip((dkw, dkb, dvw, dvb), params, strict=True)]
    return (
        d_kv @ w_ukv,  # latent
        d_g @ w_ue,  # emb
        dk[..., d_nope:].sum(1),  # the RoPE key, shared by every head
        d_kv.t() @ latent,  # W_ukv
        d_g.t() @ emb,  # W_ue
        *grads_norm,
        None, None, None, None, None, None,
    )  # fmt: skip


gated_expand.register_autograd(_backward, setup_context=_setup_context)
