"""The decode cache holds exactly what the analytic KV formula counts, and the parameter split is exact."""

from __future__ import annotations

import pytest
import torch

from conftest import small_config, small_model
from egmla import accounting


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measured_cache_bytes_equal_the_formula(variant, dtype):
    model = small_model(variant).to(dtype)
    cfg = model.cfg
    n = 17
    cache = model.new_cache(batch=3, capacity=n)
    model(torch.randint(0, 97, (3, 11)), cache)
    for _ in range(11, n):
        model(torch.randint(0, 97, (3, 1)), cache)
    width = torch.finfo(dtype).bits // 8
    assert cache.kv_bytes() == 3 * n * accounting.kv_bytes_per_token(cfg, width)
    # The allocation holds nothing else: buffers sized for n tokens are exactly n tokens' worth.
    assert cache.allocated_kv_bytes() == cache.kv_bytes()
    # Latent variants keep only the latent and the RoPE key, never an expanded K or V.
    names = {name for layer in cache.layers for name in layer.buffers}
    assert names == ({"latent", "k_rope"} if cfg.is_latent else {"k", "v"})
    # Token ids are kept (and counted apart from KV) only where a content gate must be recomputed.
    assert cache.id_bytes() == 3 * n * accounting.id_bytes_per_token(cfg)


def test_ids_kept_only_for_content_gate():
    assert accounting.id_bytes_per_token(small_config("egmla")) == 4
    for name in ("mha", "mla", "egmla_latent", "egmla_gate_off"):
        assert accounting.id_bytes_per_token(small_config(name)) == 0


def _counted(model) -> dict[str, int]:
    counts = {"non_embedding": 0, "embedding": 0, "gate_tables": 0}
    for name, p in model.named_parameters():  # tied weights appear once
        if name.startswith("gate_tables"):
            counts["gate_tables"] += p.numel()
        elif name.startswith(("embed", "lm_head")):
            counts["embedding"] += p.numel()
        else:
            counts["non_embedding"] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


@pytest.mark.parametrize("tie", [True, False])
def test_parameter_split_matches_the_module(variant, tie):
    model = small_model(variant, tie_embeddings=tie)
    assert accounting.param_counts(model.cfg) == _counted(model)


def test_matmul_params_are_the_linear_weights(variant):
    """Every Linear weight multiplies once per token; the tied output head counts although it is shared."""
    model = small_model(variant)
    expected = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert accounting.matmul_params(model.cfg) == expected


def test_gate_group_size_shares_tables():
    assert len(small_model("egmla", n_layers=5).gate_tables) == 5
    cfg = small_config(dict(variant="egmla", gate_group_size=2), n_layers=5)
    assert cfg.n_gate_tables == 3
    assert accounting.param_counts(cfg)["gate_tables"] == 3 * 97 * 12
