"""Composition of the real conf/ tree, the public surface, and one clear error per invalid configuration."""

from __future__ import annotations

import pytest
import torch

from egmla import ConfigError, accounting, build_model, compose, kv_bytes_per_token, model_config

SIZES = ["tiny", "120m", "650m", "1.2b"]
ATTENTIONS = ["mha", "gqa", "mqa", "mla", "egmla"]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_every_size_and_variant_composes_without_overrides(size, attention):
    cfg = compose([f"model={size}", f"attention={attention}"])
    with torch.device("meta"):  # shapes only: 120m EG-MLA has 280M parameters
        model = build_model(cfg)
    counted = sum(p.numel() for p in model.parameters())
    assert counted == accounting.param_counts(cfg)["total"]
    assert model.cfg.attention.variant == attention


def test_tiny_model_runs_from_composed_config():
    model = build_model(compose(["attention=egmla"]))
    logits = model(torch.randint(0, 50257, (1, 8)))
    assert logits.shape == (1, 8, 50257)


def test_120m_defaults_are_the_papers():
    mla = model_config(compose(["model=120m", "attention=mla"]))
    eg = model_config(compose(["model=120m", "attention=egmla"]))
    assert (mla.n_layers, mla.d_model, mla.n_heads) == (12, 768, 12)
    for cfg in (mla, eg):
        a = cfg.attention
        assert (a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim) == (64, 64, 64)
    assert mla.attention.kv_lora_rank == 256
    assert (eg.attention.kv_lora_rank, eg.attention.gate_dim) == (64, 256)
    assert kv_bytes_per_token(compose(["model=120m", "attention=egmla"])) == 1536 * 2


def test_overrides_reach_the_model():
    cfg = model_config(
        compose(
            [
                "model=120m",
                "attention=egmla",
                "attention.kv_lora_rank=16",
                "attention.gate_dim=128",
                "attention.gate_on=latent",
            ]
        )
    )
    assert (cfg.attention.kv_lora_rank, cfg.attention.gate_dim, cfg.attention.gate_on) == (16, 128, "latent")


BAD = [
    (["model.n_heads=5"], "model.n_heads=5 is invalid: must divide model.d_model=128"),
    (["attention=gqa", "attention.n_kv_heads=3"], "attention.n_kv_heads=3 is invalid: must divide model.n_heads=4"),
    (["attention=gqa", "attention.n_kv_heads=null"], "attention.n_kv_heads=None is invalid"),
    (["attention=gqa", "attention.n_kv_heads=0"], "attention.n_kv_heads=0 is invalid: expected a positive"),
    (["attention=mla", "attention.kv_lora_rank=0"], "attention.kv_lora_rank=0 is invalid: expected a positive"),
    (["attention=egmla", "attention.kv_lora_rank=-4"], "attention.kv_lora_rank=-4 is invalid"),
    (["attention=mla", "attention.kv_lora_rank=129"], "attention.kv_lora_rank=129 is invalid: must be in [1, model"),
    (["attention=mla", "attention.qk_rope_head_dim=7"], "attention.qk_rope_head_dim=7 is invalid: RoPE needs an even"),
    (["attention=mha", "attention.head_dim=15"], "attention.head_dim=15 is invalid: RoPE needs an even"),
    (["attention=egmla", "attention.gate_dim=0"], "attention.gate_dim=0 is invalid: expected a positive"),
    (["attention=mla", "attention.variant=mla2"], "attention.variant='mla2' is invalid: expected one of mha, gqa"),
    (
        ["attention=egmla", "attention.gate_activation=relu"],
        "attention.gate_activation='relu' is invalid: expected one of none, sigmoid, silu",
    ),
    (
        ["attention=egmla", "attention.gate_norm=batchnorm"],
        "attention.gate_norm='batchnorm' is invalid: expected one of layernorm, rmsnorm, none",
    ),
    (["attention=egmla", "attention.gate_on=query"], "attention.gate_on='query' is invalid: expected one of content"),
    (["attention=egmla", "attention.gate_kv=both"], "attention.gate_kv='both' is invalid"),
    (["attention=egmla", "attention.gate_group_size=0"], "attention.gate_group_size=0 is invalid"),
    (["attention=egmla", "attention.gate_group_size=9"], "attention.gate_group_size=9 is invalid: must be in [1,"),
    (
        ["attention=egmla", "attention.gate_kv=shared", "attention.v_head_dim=16"],
        "attention.gate_kv='shared' is invalid: a shared K/V gate needs qk_nope_head_dim (32) == v_head_dim (16)",
    ),
    (
        ["attention=egmla", "attention.absorb=true"],
        "attention.absorb=True is invalid: gating the K/V content blocks weight absorption",
    ),
    (["attention=mha", "+attention.absorb=true"], "attention.absorb=True is invalid: weight absorption exists only"),
    (["model.vocab_size=0"], "model.vocab_size=0 is invalid: expected a positive integer"),
    (["+attention.gate_width=3"], "attention.gate_width is not a known key: expected one of"),
    (["attention=foo"], "no config 'attention/foo' for overrides ['attention=foo']: expected one of egmla, egmla_add"),
    (["model=huge"], "no config 'model/huge'"),
    (["attention.bogus=1"], "cannot compose config"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_invalid_configuration_gives_one_clear_error(overrides, message):
    with pytest.raises(ConfigError) as info:
        build_model(compose(overrides))
    text = str(info.value)
    assert message in text
    assert "\n" not in text  # one line: the key, the value and what is valid
