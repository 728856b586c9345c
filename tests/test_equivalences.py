"""Variants that must coincide do: GQA with n_kv_heads == n_heads is MHA; EG-MLA with its gate off is MLA."""

from __future__ import annotations

import torch

from conftest import small_config, small_model
from egmla.model import Transformer


def test_gqa_with_all_heads_is_mha():
    mha = small_model("mha")
    gqa = Transformer(small_config(dict(variant="gqa", n_kv_heads=4))).eval()
    gqa.load_state_dict(mha.state_dict(), strict=True)
    ids = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(gqa(ids), mha(ids), rtol=0, atol=0)


def test_egmla_gate_off_is_mla():
    """Switched off, the gate leaves MLA's exact parameter set and function."""
    mla = small_model("mla")
    off = Transformer(small_config("egmla_gate_off")).eval()
    off.load_state_dict(mla.state_dict(), strict=True)  # same keys and shapes, nothing extra
    ids = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(off(ids), mla(ids), rtol=0, atol=0)
    assert len(off.gate_tables) == 0


def test_egmla_identity_gate_is_mla():
    """A gate that is identically 1 with no activation and no norm reduces EG-MLA to MLA (for both
    placements), so every difference between them is the gate's doing."""
    mla = small_model("mla")
    ids = torch.randint(0, 97, (2, 16))
    for gate_on in ("content", "latent"):
        knobs = dict(variant="egmla", gate_on=gate_on, gate_dim=1, gate_activation="none", gate_norm="none")
        eg = Transformer(small_config(knobs)).eval()
        missing, unexpected = eg.load_state_dict(mla.state_dict(), strict=False)
        assert not unexpected and all("gate" in k for k in missing)
        with torch.no_grad():
            for table in eg.gate_tables:
                table.weight.fill_(1.0)
            for block in eg.blocks:
                block.attn.gate.up.weight.fill_(1.0)
        torch.testing.assert_close(eg(ids), mla(ids), rtol=1e-6, atol=1e-6)
        with torch.no_grad():
            eg.gate_tables[0].weight[ids[0, 0]] = 2.0  # a real gate changes the output
        assert (eg(ids) - mla(ids)).abs().max() > 1e-4


def test_absorbed_decode_matches_expanded_decode():
    """DeepSeek's weight absorption is an exact rewrite of MLA decode (and of EG-MLA gating the latent)."""
    for plain, absorbed in (
        ("mla", "mla_absorbed"),
        ("egmla_latent", dict(variant="egmla", gate_on="latent", absorb=True)),
    ):
        a = small_model(plain)
        b = Transformer(small_config(absorbed)).eval()
        b.load_state_dict(a.state_dict(), strict=True)
        ids = torch.randint(0, 97, (2, 12))
        outs = []
        for model in (a, b):
            cache = model.new_cache(2, 12)
            outs.append(
                torch.cat([model(ids[:, :6], cache)] + [model(ids[:, t : t + 1], cache) for t in range(6, 12)], 1)
            )
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
