"""Shared fixtures: small model configurations of every attention variant, built without Hydra."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch

from egmla.model import AttentionConfig, ModelConfig, Transformer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Common English words for small synthetic corpora (the tests that train write a few jsonl documents of them).
WORDS = "the of and to in that it is was he for on are as with his they at be this from have or by one".split()  # noqa: SIM905


def write_jsonl(path: Path, texts: Iterable[str]) -> None:
    """One {"text": ...} document per line, as data=local reads them."""
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": text}) + "\n" for text in texts)


# name -> attention knobs; covers every variant and every open EG-MLA choice at least once.
VARIANTS = {
    "mha": dict(variant="mha"),
    "gqa": dict(variant="gqa", n_kv_heads=2),
    "mqa": dict(variant="mqa"),
    "mla": dict(variant="mla"),
    "mla_absorbed": dict(variant="mla", absorb=True),
    "mla_q_lora": dict(variant="mla", q_lora_rank=24),
    "egmla": dict(variant="egmla"),
    "egmla_shared_sigmoid_rms": dict(variant="egmla", gate_kv="shared", gate_activation="sigmoid", gate_norm="rmsnorm"),
    "egmla_silu_rope_grouped": dict(
        variant="egmla", gate_activation="silu", gate_norm="none", gate_rope_key=True, gate_group_size=2
    ),
    "egmla_latent": dict(variant="egmla", gate_on="latent"),
    "egmla_latent_absorbed": dict(variant="egmla", gate_on="latent", absorb=True, gate_rope_key=True),
    "egmla_gate_off": dict(variant="egmla", gate_enabled=False),
}


def small_config(variant: str = "mha", n_layers: int = 3, **model) -> ModelConfig:
    """A model small enough for exhaustive CPU checks; `variant` is a key of VARIANTS or raw knobs."""
    knobs = dict(VARIANTS[variant]) if isinstance(variant, str) else dict(variant)
    knobs.setdefault("kv_lora_rank", 16)
    knobs.setdefault("qk_nope_head_dim", 8)
    knobs.setdefault("qk_rope_head_dim", 8)
    knobs.setdefault("v_head_dim", 8)
    knobs.setdefault("gate_dim", 12)
    defaults = dict(vocab_size=97, n_layers=n_layers, d_model=32, n_heads=4, ffn_hidden=64, max_seq_len=64)
    return ModelConfig(**(defaults | model), attention=AttentionConfig(**knobs))


def small_model(variant: str = "mha", seed: int = 0, **model) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(small_config(variant, **model)).eval()


@pytest.fixture(params=list(VARIANTS))
def variant(request) -> str:
    return request.param
