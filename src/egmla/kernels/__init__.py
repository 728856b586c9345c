"""Fused decode for EG-MLA gating the K/V content: one new token attends over the cached latent without
writing the expanded K/V (egmla_decode.py, Triton), and the same algorithm in PyTorch (reference.py).

    model = build_model(cfg).to(device, dtype)
    enable_fused_decode(model, gate_source="table")   # or "embedding"; None turns it off
    model(next_ids, cache)                              # decode steps (T == 1) now use the fused path

Gate sources: "table" precomputes G = act(W_ue E) for the whole vocabulary once per layer (a non-persistent
buffer, vocab x n_h * (d_nope + d_v) per layer, reported apart from the KV cache) and gathers its rows by
token id; "embedding" gathers E's rows and recomputes the gate inside the kernel. Backends: "triton" (GPU, or
the CPU interpreter under TRITON_INTERPRET=1), "reference" (PyTorch, any device), "auto" (triton on CUDA when
importable, else reference). Triton is imported only when its backend runs. Both serve the multiplicative gate
with per-head norms (gate_combine=multiply, gate_norm_scope=head); check_supported refuses the others.

For training, gated_expand.py fuses EG-MLA's gate, per-head norms and K/V expansion of full forwards into one
Triton kernel (forward and backward); LatentAttention uses it with attention.fused_expand=true.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import nn

from ..model.config import check_choice, is_power_of_two
from . import reference
from .reference import DecodeWeights

GATE_SOURCES = ("table", "embedding")
BACKENDS = ("auto", "triton", "reference")

# Tiling of both backends (context tokens per tile: None = by gate source for Triton, 32 for the reference;
# tokens per split: None = the Triton heuristic, one split for the reference) and the Triton launch (warps and
# pipeline stages and heads per program: None = by gate source); egmla-bench decode sets them.
OPTIONS = {"block_s": None, "split_tokens": None, "num_warps": None, "num_stages": None, "heads_per_program": None}


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    return backend


def check_heads_per_program(heads: int, n_heads: int, label: str) -> None:
    """Raise a one-line ValueError unless `heads` (the kernel's heads per program) is a power of two dividing
    n_heads; `label` names the setting in the message."""
    if n_heads % heads or not is_power_of_two(heads):
        raise ValueError(f"{label} must be a power of two dividing the model's {n_heads} heads")


def check_supported(attn, gate_source: str, backend: str) -> None:
    """Raise a one-line ValueError when the fused decode cannot serve this attention layer."""
    fallback = "decode with the unfused path (do not enable the fused decode)"
    check_choice("gate_source", gate_source, GATE_SOURCES)
    if getattr(attn, "gate_on", None) != "content":
        raise ValueError(f"the fused decode serves EG-MLA gating the K/V content only; {fallback}")
    if attn.gate_combine != "multiply":
        raise ValueError(f"the fused decode multiplies the gate; attention.gate_combine=add: {fallback}")
    if attn.vector_norm:
        raise ValueError(f"the fused decode norms per head; attention.gate_norm_scope=vector: {fallback}")
    if backend == "triton":
        if not triton_available():
            raise ValueError(f"the Triton backend needs triton installed; use backend='reference' or {fallback}")
        dims = {"qk_nope_head_dim": attn.d_nope, "v_head_dim": attn.d_v, "qk_rope_head_dim": attn.d_rope,
                "kv_lora_rank": attn.d_c}  # fmt: skip
        if gate_source == "embedding":
            dims["gate_dim"] = attn.gate.up.in_features
        for key, value in dims.items():
            if not is_power_of_two(value, 16):
                raise ValueError(
                    f"the Triton fused decode needs powers of two >= 16; attention.{key}={value}: {fallback}"
                )
        if attn.wkv_b.weight.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"the Triton backend runs on CUDA (or on CPU under TRITON_INTERPRET=1); {fallback}")


@torch.no_grad()
def build_gate_rows(attn, gate_table: nn.Embedding, chunk: int = 8192) -> torch.Tensor:
    """G = act(W_ue E) for every vocabulary row [V, gate width], in the weights' dtype (RoPE-key gate left out:
    it is applied before caching)."""
    table = gate_table.weight
    rows = torch.empty(table.shape[0], attn.gate.width, dtype=table.dtype, device=table.device)
    for i in range(0, table.shape[0], chunk):
        rows[i : i + chunk] = attn.gate(table[i : i + chunk])[0]
    return rows


def decode_weights(attn, gate_table: nn.Embedding) -> DecodeWeights:
    """One layer's weights as the fused decode reads them (views, no copies)."""
    table, norm = attn.fused_decode[0] == "table", attn.gate_norm
    return DecodeWeights(
        w_ukv=attn.wkv_b.weight.view(attn.n_heads, attn.d_nope + attn.d_v, attn.d_c),
        d_nope=attn.d_nope,
        scale=attn.scale,
        shared=attn.gate_kv == "shared",
        gate_rows=attn.fused_gate_rows if table else None,
        embedding=None if table else gate_table.weight,
        w_ue=None if table else attn.gate.up.weight,
        activation=attn.gate.activation_kind,
        norm=norm,
        k_weight=None if norm == "none" else attn.k_norm.weight,
        k_bias=getattr(attn.k_norm, "bias", None),
        v_weight=None if norm == "none" else attn.v_norm.weight,
        v_bias=getattr(attn.v_norm, "bias", None),
        eps=getattr(attn.k_norm, "eps", 0.0),
    )


def fused_decode(attn, q_nope, q_rope, latent, k_rope, ids, gate_table) -> torch.Tensor:
    """The attention output [B, H, d_v] of one new token per sequence (called by LatentAttention).

    gate_table is not read here (attn.fused_weights holds its weight); it is passed so that callers that
    record these calls, such as egmla-bench decode's check, can rerun the layer unfused."""
    w = attn.fused_weights
    if attn.fused_decode[1] == "triton":
        from . import egmla_decode  # imports triton

        return egmla_decode.decode_attention(q_nope, q_rope, latent, k_rope, ids, w, **OPTIONS)
    tiling = {"block_s": OPTIONS["block_s"] or 32, "split_tokens": OPTIONS["split_tokens"]}
    return reference.decode_attention(q_nope, q_rope, latent, k_rope, ids, w, **tiling)


def enable_fused_decode(model: nn.Module, gate_source: str | None, backend: str = "auto") -> str | None:
    """Switch every EG-MLA layer of `model` to the fused decode (None switches back); returns the backend used.

    Call it after moving the model to its device and dtype: the gate table is built where the weights are.
    """
    from ..model.attention import LatentAttention

    layers = [(i, b.attn) for i, b in enumerate(model.blocks) if isinstance(b.attn, LatentAttention)]
    if gate_source is None:
        for _, attn in layers:
            attn.enable_fused_decode(None)
        return None
    backend = resolve_backend(backend, model.embed.weight.device)
    if not layers:
        raise ValueError("the fused decode serves EG-MLA gating the K/V content only; this model has no such layer")
    for i, attn in layers:
        attn.enable_fused_decode(gate_source, model.gate_table(i), backend)
    return backend
