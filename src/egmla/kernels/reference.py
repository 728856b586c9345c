"""The fused EG-MLA decode algorithm in plain PyTorch: what the Triton kernel computes, step for step.

One new token per sequence attends over a context of S cached tokens. For each (sequence, head) the context
is cut into splits of `split_tokens` tokens; each split walks its tokens in tiles of `block_s`, and per tile:
  k_nope = W_uk[h] c, v = W_uv[h] c               from the cached latent c [block_s, d_c]
  g_k, g_v = G[ids] (precomputed per-vocabulary table) or act(W_ue E[ids]) (recomputed from the embedding)
  k = Norm_k(k_nope * g_k), v = Norm_v(v * g_v)   per head, in fp32 (the key's norm folded into the score:
                                                  only row sums of the gated keys are needed; the values'
                                                  affine folded into the output)
  score = (q_nope . k + q_rope . k_rope) * scale, folded into an online softmax (running max, sum, output)
Each split ends with its normalised output and log-sum-exp; a second pass merges the splits. Nothing expanded
is kept beyond one tile. The CPU tests hold this against the model's unfused decode; on a GPU the Triton
kernel (egmla_decode.py) follows the same steps on chip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DecodeWeights:
    """What one layer's fused decode reads besides the cache (views of the model's weights, no copies).

    w_ukv [H, d_nope + d_v, d_c]: W_ukv per head. Gate source: either gate_rows [V, >= W] = act(W_ue E) for the
    whole vocabulary, or embedding [V, gate_dim] with w_ue [>= W, gate_dim] and the activation; W (the gate
    width) is H * (d_nope + d_v), per head [g_k; g_v], or H * d_nope when one gate is shared by K and V.
    Norm: layernorm (weight and bias), rmsnorm (weight) or none, with eps; scale is the softmax scale; d_rope
    the RoPE key's width (the inputs carry it; the Triton backend checks it when it is set up).
    """

    w_ukv: torch.Tensor
    d_nope: int
    scale: float
    shared: bool = False
    d_rope: int = 0
    gate_rows: torch.Tensor | None = None
    embedding: torch.Tensor | None = None
    w_ue: torch.Tensor | None = None
    activation: str = "none"
    norm: str = "layernorm"
    k_weight: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_weight: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    eps: float = 1e-6

    @property
    def n_heads(self) -> int:
        return self.w_ukv.shape[0]

    @property
    def d_v(self) -> int:
        return self.w_ukv.shape[1] - self.d_nope

    @property
    def gate_width(self) -> int:
        return self.n_heads * (self.d_nope if self.shared else self.d_nope + self.d_v)


def split_layout(s: int, block_s: int, split_tokens: int | None) -> tuple[int, int]:
    """(tokens per split, number of splits): splits are whole tiles and none is empty; None: one split."""
    split = max(block_s, -(-(split_tokens or s) // block_s) * block_s)
    return split, -(-s // split)


def activate(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "sigmoid":
        return torch.sigmoid(x)
    if kind == "silu":
        return F.silu(x)
    return x


def gate_from_embedding(e: torch.Tensor, w: DecodeWeights, dtype: torch.dtype) -> torch.Tensor:
    """act(W_ue e) of embedding rows e [..., gate_dim]: the content gate [..., gate width] (no RoPE-key part)."""
    return activate(e.to(dtype) @ w.w_ue[: w.gate_width].to(dtype).T, w.activation)


def gate_tile(ids: torch.Tensor, w: DecodeWeights, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Gates (g_k, g_v) [..., H, d] of the tokens `ids` [...], from the table or recomputed from E."""
    width = w.gate_width
    table = w.gate_rows is not None
    g = w.gate_rows[ids].to(dtype) if table else gate_from_embedding(w.embedding[ids], w, dtype)
    g = g[..., :width].unflatten(-1, (w.n_heads, -1))
    return (g, g) if w.shared else (g[..., : w.d_nope], g[..., w.d_nope :])


@torch.no_grad()
def decode_attention(
    q_nope, q_rope, latent, k_rope, ids, w: DecodeWeights, block_s: int = 32, split_tokens: int | None = None
) -> torch.Tensor:
    """Attention output [B, H, d_v] of one new token per sequence over its cached context.

    q_nope [B, H, d_nope], q_rope [B, H, d_rope] (rotated); latent [B, S, d_c] (normalised, as cached);
    k_rope [B, S, d_rope] (rotated, as cached); ids [B, S] the context's token ids.
    """
    b, h, _ = q_nope.shape
    s = latent.shape[1]
    f = torch.promote_types(latent.dtype, torch.float32)  # fp32 registers; float64 stays float64 (tests)
    split, n_split = split_layout(s, block_s, split_tokens)
    w_uk, w_uv = w.w_ukv[:, : w.d_nope].to(f), w.w_ukv[:, w.d_nope :].to(f)
    q_nope, q_rope = q_nope.to(f), q_rope.to(f)
    # The norms fold into the score and the output (no normalised tile is formed): with x = k_nope * g_k,
    # q . LayerNorm(x) = rstd(x) * (sum(q w x) - mean(x) * sum(q w)) + q . b; for the values only the affine
    # folds: the softmax-weighted sum of LayerNorm(y_t) = w * sum_t p_t yhat_t + b * sum_t p_t.
    qk = q_nope * w.k_weight.to(f) if w.norm != "none" else q_nope
    qk_sum = qk.sum(-1)
    qk_bias = (q_nope * w.k_bias.to(f)).sum(-1) if w.norm == "layernorm" else 0.0

    # Running max, sum and (unnormalised) output of every (sequence, head, split).
    m = torch.full((b, h, n_split), float("-inf"), dtype=f, device=latent.device)
    l = torch.zeros(b, h, n_split, dtype=f, device=latent.device)
    acc = torch.zeros(b, h, n_split, w.d_v, dtype=f, device=latent.device)
    lane = torch.arange(block_s, device=latent.device)
    for t0 in range(0, split, block_s):  # all splits advance together, one tile at a time
        pos = torch.arange(n_split, device=latent.device)[:, None] * split + t0 + lane  # [n_split, block_s]
        valid = pos < s
        pos = pos.clamp(max=s - 1)  # masked lanes load a real token; their score is -inf below
        c = latent[:, pos].to(f)  # [B, n_split, block_s, d_c]
        g_k, g_v = gate_tile(ids[:, pos].long(), w, f)  # [B, n_split, block_s, H, d]
        x = torch.einsum("bntc,hdc->bhntd", c, w_uk) * g_k.permute(0, 3, 1, 2, 4)  # [B, H, n_split, block_s, d]
        y = torch.einsum("bntc,hdc->bhntd", c, w_uv) * g_v.permute(0, 3, 1, 2, 4)
        score = torch.einsum("bhntd,bhd->bhnt", x, qk)
        if w.norm == "layernorm":
            mean = x.mean(-1)
            rstd = torch.rsqrt(((x * x).mean(-1) - mean * mean).clamp_min(0) + w.eps)
            score = rstd * (score - mean * qk_sum[..., None, None]) + qk_bias[..., None, None]
        elif w.norm == "rmsnorm":
            score = score * torch.rsqrt((x * x).mean(-1) + w.eps)
        score = score + torch.einsum("bntr,bhr->bhnt", k_rope[:, pos].to(f), q_rope)
        score = (score * w.scale).masked_fill(~valid, float("-inf"))
        m_new = torch.maximum(m, score.amax(-1))
        alpha = torch.exp(m - m_new)
        p = torch.exp(score - m_new[..., None])
        l = l * alpha + p.sum(-1)
        if w.norm == "layernorm":  # normalised without the affine, which is applied to the output at the end
            y = F.layer_norm(y, y.shape[-1:], eps=w.eps)
        elif w.norm == "rmsnorm":
            y = F.rms_norm(y, y.shape[-1:], eps=w.eps)
        acc = acc * alpha[..., None] + torch.einsum("bhnt,bhntv->bhnv", p, y)
        m = m_new
    out = acc / l[..., None]
    if w.norm != "none":
        out = out * w.v_weight.to(f)
    if w.norm == "layernorm":
        out = out + w.v_bias.to(f)
    return merge_splits(out, m + torch.log(l)).to(latent.dtype)


def merge_splits(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Combine per-split normalised outputs out [..., n_split, d_v] by their log-sum-exp lse [..., n_split]."""
    weight = torch.softmax(lse, dim=-1)
    return (out * weight[..., None]).sum(-2)
