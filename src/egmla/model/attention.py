"""The attention variants: MHA/GQA/MQA (one class, n_kv_heads) and MLA/EG-MLA (one class, optional gate).

Every attention takes (x, ids, start, cache, context_ids, gate_table):
  x [B, T, d_model] normalised input; ids [B, T] the tokens' ids (EG-MLA's gate reads them);
  start: position of x's first token; cache: this layer's LayerCache (None for a plain forward);
  context_ids [B, start + T]: ids of the whole context (kept only for EG-MLA gating the content);
  gate_table: this layer's token-embedding table (EG-MLA; shared by `gate_group_size` adjacent layers).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import FALLBACK, DecodeWeights, FusedDecode, LaunchOptions
from .cache import LayerCache
from .config import ConfigError, ModelConfig
from .layers import RMSNorm, Rotary


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v where query i (the last T of S positions) sees keys 0 .. S - T + i.

    q [B, H, T, dq], k [B, Hkv, S, dq], v [B, Hkv, S, dv]; Hkv divides H (grouped-query broadcast).
    """
    t, s = q.shape[-2], k.shape[-2]
    gqa = k.shape[1] != q.shape[1]
    if t == s:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if t == 1:  # one new token sees the whole context
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    return nn.Identity()


class GroupedQueryAttention(nn.Module):
    """MHA (n_kv_heads == n_heads), GQA (n_kv_heads divides n_heads) and MQA (n_kv_heads == 1)."""

    def __init__(self, cfg: ModelConfig, rotary: Rotary):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)
        self.rotary = rotary

    def cache_spec(self) -> dict[str, tuple[int, ...]]:
        return {"k": (self.n_kv_heads, self.head_dim), "v": (self.n_kv_heads, self.head_dim)}

    def forward(self, x, ids, start=0, cache: LayerCache | None = None, context_ids=None, gate_table=None):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rotary(q, start), self.rotary(k, start)
        if cache is not None:
            k, v = cache.update(start, k=k, v=v)
        y = causal_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


# W_ue e that makes act(W_ue e) the identity of the combine: g == 1 for multiply, g == 0 for add
# (silu(z) = 1 at z = 1.27846...; a sigmoid reaches neither, which the config refuses).
IDENTITY_PREACTIVATION = {
    ("multiply", "none"): 1.0,
    ("multiply", "silu"): 1.2784645427610737,
    ("add", "none"): 0.0,
    ("add", "silu"): 0.0,
}


class EmbeddingGate(nn.Module):
    """EG-MLA's gate g = act(W_ue e) for e = E_layer[token id]; the table itself is passed in per call.

    Output width: on content, n_h * (d_nope + d_v) (separate K and V gates) or n_h * d_nope (one gate
    shared by K and V); on the latent, d_c. Plus d_rope when the decoupled RoPE key is gated too.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        a = cfg.attention
        self.width = cfg.gate_width  # the content's (or latent's) gate; the RoPE key's comes after it
        self.rope_width = a.qk_rope_head_dim if a.gate_rope_key else 0
        self.up = nn.Linear(a.gate_dim, self.width + self.rope_width, bias=False)
        self.activation_kind = a.gate_activation
        self.activation = {"none": nn.Identity(), "sigmoid": nn.Sigmoid(), "silu": nn.SiLU()}[a.gate_activation]
        self.combine_kind = a.gate_combine
        self.combine = torch.mul if a.gate_combine == "multiply" else torch.add

    @torch.no_grad()
    def init_identity_(self) -> None:
        """W_ue reads only the tables' first column (set to 1 by the model's init) with the weight that makes
        g the combine's identity for every token; the other columns start at 0 and learn from the first step."""
        self.up.weight.zero_()
        self.up.weight[:, 0] = IDENTITY_PREACTIVATION[(self.combine_kind, self.activation_kind)]

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (gate for the content or latent, gate for the RoPE key or None)."""
        g = self.activation(self.up(emb))
        if not self.rope_width:
            return g, None
        return g[..., : -self.rope_width], g[..., -self.rope_width :]

    def rope_gate(self, emb: torch.Tensor) -> torch.Tensor | None:
        """The RoPE key's gate alone (the fused expansion computes the content's gate itself)."""
        return self.activation(F.linear(emb, self.up.weight[self.width :])) if self.rope_width else None


class LatentAttention(nn.Module):
    """MLA (DeepSeek-V2) and, with a gate, EG-MLA.

    c_kv = RMSNorm(W_dkv h) and k_rope = RoPE(W_kr h) are what the cache holds; [k_nope; v] = W_ukv c_kv.
    EG-MLA gating the content: [k_nope; v] = Norm(W_ukv c_kv * g) per head (or over all heads' K and all
    heads' V with gate_norm_scope=vector), g recomputed from token ids.
    EG-MLA gating the latent: c_kv <- Norm(c_kv * g) before caching, so decoding stays MLA's.
    gate_combine=add replaces every `* g` by `+ g` (the RoPE key's gate included): same weights, no gating.
    """

    def __init__(self, cfg: ModelConfig, rotary: Rotary):
        super().__init__()
        a = cfg.attention
        self.n_heads = cfg.n_heads
        self.d_nope, self.d_rope, self.d_v, self.d_c = (
            a.qk_nope_head_dim,
            a.qk_rope_head_dim,
            a.v_head_dim,
            a.kv_lora_rank,
        )
        d_qk = self.d_nope + self.d_rope
        if a.q_lora_rank is None:
            self.wq = nn.Linear(cfg.d_model, self.n_heads * d_qk, bias=False)
        else:
            self.wq_a = nn.Linear(cfg.d_model, a.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(a.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(a.q_lora_rank, self.n_heads * d_qk, bias=False)
        self.wkv_a = nn.Linear(cfg.d_model, self.d_c + self.d_rope, bias=False)  # [W_dkv; W_kr]
        self.kv_norm = RMSNorm(self.d_c, cfg.norm_eps)
        self.wkv_b = nn.Linear(self.d_c, self.n_heads * (self.d_nope + self.d_v), bias=False)  # W_ukv
        self.wo = nn.Linear(self.n_heads * self.d_v, cfg.d_model, bias=False)
        self.rotary = rotary
        self.scale = d_qk**-0.5
        self.absorb = a.absorb

        self.gate = EmbeddingGate(cfg) if cfg.has_gate else None
        self.gate_on = a.gate_on if cfg.has_gate else None
        self.gate_kv = a.gate_kv
        self.gate_norm = a.gate_norm
        self.gate_combine = a.gate_combine if cfg.has_gate else None
        self.vector_norm = cfg.vector_norm
        self.fused_expand = a.fused_expand and self.gate_on == "content"
        if self.gate_on == "latent":
            self.latent_norm = _norm(a.gate_norm, self.d_c, cfg.norm_eps)
        elif self.gate_on == "content":
            heads = self.n_heads if self.vector_norm else 1
            self.k_norm = _norm(a.gate_norm, heads * self.d_nope, cfg.norm_eps)
            self.v_norm = _norm(a.gate_norm, heads * self.d_v, cfg.norm_eps)
        self.fused_decode: FusedDecode | None = None  # decode only: see enable_fused_decode

    def cache_spec(self) -> dict[str, tuple[int, ...]]:
        return {"latent": (self.d_c,), "k_rope": (self.d_rope,)}

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self.wq(x) if hasattr(self, "wq") else self.wq_b(self.q_norm(self.wq_a(x)))

    def forward(self, x, ids, start=0, cache: LayerCache | None = None, context_ids=None, gate_table=None):
        b, t, _ = x.shape
        q = self.query(x).view(b, t, self.n_heads, self.d_nope + self.d_rope).transpose(1, 2)
        q_nope, q_rope = q.split([self.d_nope, self.d_rope], dim=-1)
        q_rope = self.rotary(q_rope, start)

        latent, k_rope = self.wkv_a(x).split([self.d_c, self.d_rope], dim=-1)
        latent = self.kv_norm(latent)
        gate = emb = None
        fused = self.fused_expand and cache is None  # full forwards only; decoding has its own fused kernel
        if self.gate is not None:
            emb = gate_table(ids)
            gate, rope_gate = (None, self.gate.rope_gate(emb)) if fused else self.gate(emb)
            if rope_gate is not None:
                k_rope = self.gate.combine(k_rope, rope_gate)  # before rotation: the gate is position-free
            if self.gate_on == "latent":
                latent = self.latent_norm(self.gate.combine(latent, gate))
        k_rope = self.rotary(k_rope, start)

        if cache is not None:
            latent, k_rope = cache.update(start, latent=latent, k_rope=k_rope)
            if self.fused_decode is not None and t == 1:
                y = self.fused_decode(q_nope[:, :, 0], q_rope[:, :, 0], latent, k_rope, context_ids)[:, :, None]
                return self.wo(y.transpose(1, 2).reshape(b, t, -1))
            if self.gate_on == "content" and latent.shape[1] != t:
                gate, _ = self.gate(gate_table(context_ids))  # recompute the gate for the whole context
        if self.absorb and cache is not None:
            y = self._attend_absorbed(q_nope, q_rope, latent, k_rope)
        else:  # expand K/V for every context token from the latent, (gate and normalise,) then attend
            k, v = self.expand_fused(latent, k_rope, emb) if fused else self.expand(latent, k_rope, gate)
            y = self._attend(q_nope, q_rope, k, v)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))

    def _attend(self, q_nope, q_rope, k, v):
        """SDPA of the queries [b, h, t, .] over expanded K/V [b, s, h, .]."""
        q = torch.cat([q_nope, q_rope], dim=-1)
        return causal_attention(q, k.transpose(1, 2), v.transpose(1, 2), self.scale)

    def expand(self, latent, k_rope, gate):
        """K [b, s, h, d_nope + d_rope] and V [b, s, h, d_v] of every token from its latent and (rotated) RoPE
        key; for EG-MLA gating the content, gated by `gate` and normalised per head (what gated_expand fuses) or
        over all heads (gate_norm_scope=vector)."""
        b, s, _ = latent.shape
        kv = self.wkv_b(latent).view(b, s, self.n_heads, self.d_nope + self.d_v)
        k_nope, v = kv.split([self.d_nope, self.d_v], dim=-1)
        if self.gate_on == "content":
            if self.gate_kv == "shared":
                g_k = g_v = gate.view(b, s, self.n_heads, self.d_nope)
            else:
                g_k, g_v = gate.view(b, s, self.n_heads, self.d_nope + self.d_v).split([self.d_nope, self.d_v], dim=-1)
            k_nope, v = self.gate.combine(k_nope, g_k), self.gate.combine(v, g_v)
            if self.vector_norm:
                k_nope, v = self.k_norm(k_nope.flatten(-2)).view_as(k_nope), self.v_norm(v.flatten(-2)).view_as(v)
            else:
                k_nope, v = self.k_norm(k_nope), self.v_norm(v)
        k = torch.cat([k_nope, k_rope[:, :, None, :].expand(b, s, self.n_heads, self.d_rope)], dim=-1)
        return k, v

    def expand_fused(self, latent, k_rope, emb):
        """As expand for EG-MLA gating the content, with the gate, norms and expansion in one Triton kernel
        (egmla.kernels.gated_expand) fed with the gate's embedding rows `emb`; K/V in the compute dtype."""
        if latent.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError(
                "attention.fused_expand=true runs on CUDA GPUs: set attention.fused_expand=false on a CPU"
            )
        if self.gate_combine != "multiply" or self.vector_norm:  # the config refuses these; a hand-edited one
            raise ConfigError("attention.fused_expand=true multiplies the gate and norms per head: set it to false")
        from ..kernels.gated_expand import gated_expand  # imports triton

        b, s, _ = latent.shape
        device = latent.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else latent.dtype
        norms = [getattr(m, name, None) for m in (self.k_norm, self.v_norm) for name in ("weight", "bias")]
        k, v = gated_expand(
            latent.reshape(b * s, -1).to(dtype),
            emb.reshape(b * s, -1).to(dtype),
            k_rope.reshape(b * s, -1).to(dtype),
            self.wkv_b.weight.to(dtype),
            self.gate.up.weight[: self.gate.width].to(dtype),
            *norms,
            self.n_heads,
            self.d_nope,
            self.gate_kv == "shared",
            self.gate.activation_kind,
            self.gate_norm,
            getattr(self.k_norm, "eps", 0.0),
        )
        return k.view(b, s, self.n_heads, -1), v.view(b, s, self.n_heads, -1)

    def decode_weights(self, gate_table: nn.Embedding) -> DecodeWeights:
        """This layer's weights as the fused decode reads them (views, no copies), with its gate table's rows;
        a one-line ValueError for a layer the fused decode cannot serve."""
        if self.gate_on != "content":
            raise ValueError(f"the fused decode serves EG-MLA gating the K/V content only; {FALLBACK}")
        if self.gate_combine != "multiply":
            raise ValueError(f"the fused decode multiplies the gate; attention.gate_combine=add: {FALLBACK}")
        if self.vector_norm:
            raise ValueError(f"the fused decode norms per head; attention.gate_norm_scope=vector: {FALLBACK}")
        norm = self.gate_norm
        return DecodeWeights(
            w_ukv=self.wkv_b.weight.view(self.n_heads, self.d_nope + self.d_v, self.d_c),
            d_nope=self.d_nope,
            scale=self.scale,
            shared=self.gate_kv == "shared",
            d_rope=self.d_rope,
            embedding=gate_table.weight,
            w_ue=self.gate.up.weight,
            activation=self.gate.activation_kind,
            norm=norm,
            k_weight=None if norm == "none" else self.k_norm.weight,
            k_bias=getattr(self.k_norm, "bias", None),
            v_weight=None if norm == "none" else self.v_norm.weight,
            v_bias=getattr(self.v_norm, "bias", None),
            eps=getattr(self.k_norm, "eps", 0.0),
        )

    def enable_fused_decode(
        self,
        gate_source: str | None,
        gate_table: nn.Embedding | None = None,
        backend: str = "reference",
        launch: LaunchOptions | None = None,
    ) -> None:
        """Decode single tokens with the fused kernel (EG-MLA gating the content), or stop with None.

        gate_source "table" builds G = act(W_ue E) for the whole vocabulary; "embedding" recomputes the gate from
        E's rows in the kernel. Prefer Transformer.enable_fused_decode, which does every layer.
        """
        weights = None if gate_source is None else self.decode_weights(gate_table)
        self.fused_decode = None if weights is None else FusedDecode(weights, gate_source, backend, launch)

    def _attend_absorbed(self, q_nope, q_rope, latent, k_rope):
        """DeepSeek's decode: fold W_uk into the query and W_uv into the output; attend over the latent."""
        w = self.wkv_b.weight.view(self.n_heads, self.d_nope + self.d_v, self.d_c)
        w_uk, w_uv = w[:, : self.d_nope], w[:, self.d_nope :]
        q_latent = torch.einsum("bhtn,hnc->bhtc", q_nope, w_uk)
        b, h, t, _ = q_latent.shape
        s = latent.shape[1]
        # Every head attends to one shared latent "head" (MQA-style): fold the heads into the query axis so that
        # SDPA reads the latent once instead of repeating it per head (its fallback for d_c + d_rope > 256 does).
        q = torch.cat([q_latent, q_rope], dim=-1).reshape(b, 1, h * t, -1)
        k = torch.cat([latent, k_rope], dim=-1)[:, None]
        mask = None
        if t > 1:  # query i of each head sees keys 0 .. s - t + i
            mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t).repeat(h, 1)
        o = F.scaled_dot_product_attention(q, k, latent[:, None], attn_mask=mask, scale=self.scale)
        return torch.einsum("bhtc,hvc->bhtv", o.view(b, h, t, -1), w_uv)


def build_attention(cfg: ModelConfig, rotary: Rotary) -> nn.Module:
    return LatentAttention(cfg, rotary) if cfg.is_latent else GroupedQueryAttention(cfg, rotary)
