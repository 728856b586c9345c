"""Analytic KV-cache, parameter and FLOP accounting of a model configuration. The tests hold these formulas
against the real modules: cache tensors, parameter counts and torch's FLOP counter.

KV elements per token per layer (docs/paper.md): MHA/GQA/MQA 2 * n_kv * d_head; MLA and EG-MLA d_c + d_rope.
EG-MLA gating the K/V content also keeps the context's token ids (int32, shared by all layers) to recompute
its gate: reported as `id_bytes_per_token`, never inside KV.

FLOPs per token (the MFU convention of docs/design.md; training = forward + backward):
    6 * matmul_params + 6 * n_layers * n_heads * (d_qk + d_v) * seq
matmul_params counts every Linear weight, the output head included even when tied; embedding and gate-table
lookups are excluded; no causal discount.
"""

from __future__ import annotations

from typing import Any

from .config import model_config
from .model import ModelConfig
from .model.config import check_choice

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
ID_BYTES = 4  # int32 token id


def _bytes_per_element(dtype: str | int) -> int:
    if isinstance(dtype, int):
        return dtype
    check_choice("dtype", dtype, tuple(DTYPE_BYTES))
    return DTYPE_BYTES[dtype]


def kv_elements_per_layer(cfg: Any) -> int:
    cfg = model_config(cfg)
    a = cfg.attention
    if cfg.is_latent:
        return a.kv_lora_rank + a.qk_rope_head_dim
    return 2 * cfg.kv_heads * cfg.head_dim


def kv_elements_per_token(cfg: Any) -> int:
    cfg = model_config(cfg)
    return cfg.n_layers * kv_elements_per_layer(cfg)


def kv_bytes_per_token(cfg: Any, dtype: str | int = "bf16") -> int:
    """Analytic KV-cache bytes per token, all layers (bf16 unless `dtype` says otherwise)."""
    return kv_elements_per_token(cfg) * _bytes_per_element(dtype)


def id_bytes_per_token(cfg: Any) -> int:
    """Bytes per token of kept token ids: EG-MLA gating the content only."""
    cfg = model_config(cfg)
    return ID_BYTES if cfg.keeps_ids else 0


def _norm_params(kind: str, dim: int) -> int:
    return {"layernorm": 2 * dim, "rmsnorm": dim, "none": 0}[kind]


def _attention_params(cfg: ModelConfig) -> tuple[int, int]:
    """(matmul weights, other weights) of one attention layer."""
    a, d, h = cfg.attention, cfg.d_model, cfg.n_heads
    if not cfg.is_latent:
        hd, kv = cfg.head_dim, cfg.kv_heads
        return 2 * d * h * hd + 2 * d * kv * hd, 0
    d_qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    if a.q_lora_rank is None:
        matmul, other = d * h * d_qk, 0
    else:
        matmul, other = d * a.q_lora_rank + a.q_lora_rank * h * d_qk, a.q_lora_rank
    matmul += d * (a.kv_lora_rank + a.qk_rope_head_dim)  # W_dkv, W_kr
    matmul += a.kv_lora_rank * h * (a.qk_nope_head_dim + a.v_head_dim)  # W_ukv
    matmul += h * a.v_head_dim * d  # W_o
    other += a.kv_lora_rank  # latent RMSNorm
    if cfg.has_gate:
        matmul += a.gate_dim * (cfg.gate_width + (a.qk_rope_head_dim if a.gate_rope_key else 0))
        if a.gate_on == "latent":
            other += _norm_params(a.gate_norm, a.kv_lora_rank)
        else:
            heads = h if cfg.vector_norm else 1  # one norm over all heads' K (and V), or one per head's width
            other += heads * (_norm_params(a.gate_norm, a.qk_nope_head_dim) + _norm_params(a.gate_norm, a.v_head_dim))
    return matmul, other


def matmul_params(cfg: Any) -> int:
    """Weights that take part in a matmul per token: every Linear, the output head included."""
    cfg = model_config(cfg)
    attn, _ = _attention_params(cfg)
    per_layer = attn + 3 * cfg.d_model * cfg.ffn_hidden
    return cfg.n_layers * per_layer + cfg.vocab_size * cfg.d_model


def param_counts(cfg: Any) -> dict[str, int]:
    """Parameters split as non_embedding (blocks + final norm), embedding (token table, plus the output
    head when untied) and gate_tables (EG-MLA's token tables); total is their sum."""
    cfg = model_config(cfg)
    attn_matmul, attn_other = _attention_params(cfg)
    per_layer = attn_matmul + attn_other + 3 * cfg.d_model * cfg.ffn_hidden + 2 * cfg.d_model
    non_embedding = cfg.n_layers * per_layer + cfg.d_model
    embedding = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    gate_tables = cfg.n_gate_tables * cfg.vocab_size * cfg.attention.gate_dim
    return {
        "non_embedding": non_embedding,
        "embedding": embedding,
        "gate_tables": gate_tables,
        "total": non_embedding + embedding + gate_tables,
    }


def attention_dims(cfg: Any) -> tuple[int, int]:
    """(d_qk, d_v) per head."""
    cfg = model_config(cfg)
    a = cfg.attention
    if cfg.is_latent:
        return a.qk_nope_head_dim + a.qk_rope_head_dim, a.v_head_dim
    return cfg.head_dim, cfg.head_dim


def flops_per_token(cfg: Any, seq_len: int | None = None) -> int:
    """Training FLOPs per token (forward + backward) at sequence length `seq_len` (default max_seq_len)."""
    cfg = model_config(cfg)
    seq = seq_len or cfg.max_seq_len
    d_qk, d_v = attention_dims(cfg)
    return 6 * matmul_params(cfg) + 6 * cfg.n_layers * cfg.n_heads * (d_qk + d_v) * seq


def summary(cfg: Any, dtype: str = "bf16", seq_len: int | None = None) -> dict[str, Any]:
    """Everything a run reports about its model's costs (the `params` and `kv` blocks of results.json)."""
    cfg = model_config(cfg)
    return {
        "params": param_counts(cfg),
        "kv": {
            "elements_per_layer": kv_elements_per_layer(cfg),
            "elements_per_token": kv_elements_per_token(cfg),
            "bytes_per_token": kv_bytes_per_token(cfg, dtype),
            "dtype": dtype,
            "id_bytes_per_token": id_bytes_per_token(cfg),
        },
        "flops_per_token": flops_per_token(cfg, seq_len),
        "matmul_params": matmul_params(cfg),
    }


def saving(cfg: Any, reference: Any) -> float:
    """Fraction of the reference's KV cache that `cfg` saves (0.9167 = 91.67% smaller)."""
    return 1.0 - kv_elements_per_token(cfg) / kv_elements_per_token(reference)
