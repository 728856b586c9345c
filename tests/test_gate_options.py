"""EG-MLA's gate options against independent references: the additive control (gate_combine=add), the
identity init (gate_init=identity) and one norm over all heads (gate_norm_scope=vector); the fused paths'
refusals. Causality, decode == full forward, cache bytes, parameter and FLOP accounting of these options run
with every variant (conftest.VARIANTS: egmla_add, egmla_add_latent_absorbed, egmla_vector, egmla_identity_silu)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import small_config, small_model
from egmla import ConfigError, accounting, build_model, compose, model_config
from egmla.model import Transformer


def _norm(x: torch.Tensor, kind: str, module) -> torch.Tensor:
    if kind == "layernorm":
        return F.layer_norm(x, x.shape[-1:], module.weight, module.bias, module.eps)
    if kind == "rmsnorm":
        return F.rms_norm(x, x.shape[-1:], module.weight, module.eps)
    return x


def reference_layer(attn, table, x, ids, a, gated: bool = True) -> torch.Tensor:
    """The EG-MLA layer (activation none, RoPE key ungated) written out: g = W_ue E[ids] combined with
    W_ukv c_kv (content) or c_kv (latent), normalised per head, over all heads (vector) or over d_c; gated=False
    leaves the gate term out: Norm(W_ukv c_kv), or Norm(c_kv) on the latent."""
    b, t, _ = x.shape
    h, dn, dr, dv = attn.n_heads, attn.d_nope, attn.d_rope, attn.d_v
    q = (x @ attn.wq.weight.T).view(b, t, h, dn + dr)
    c, k_rope = (x @ attn.wkv_a.weight.T).split([attn.d_c, dr], dim=-1)
    c = F.rms_norm(c, (attn.d_c,), attn.kv_norm.weight, attn.kv_norm.eps)
    g = table.weight[ids] @ attn.gate.up.weight[: attn.gate.width].T

    def combine(u, gate):
        return u if not gated else (u + gate if a.gate_combine == "add" else u * gate)

    if a.gate_on == "latent":
        c = _norm(combine(c, g), a.gate_norm, attn.latent_norm)
    kv = (c @ attn.wkv_b.weight.T).view(b, t, h, dn + dv)
    k_nope, v = kv.split([dn, dv], dim=-1)
    if a.gate_on == "content":
        if a.gate_kv == "shared":
            g_k = g_v = g.view(b, t, h, dn)
        else:
            g_k, g_v = g.view(b, t, h, dn + dv).split([dn, dv], dim=-1)
        k_nope, v = combine(k_nope, g_k), combine(v, g_v)
        if a.gate_norm_scope == "vector":
            k_nope = _norm(k_nope.reshape(b, t, h * dn), a.gate_norm, attn.k_norm).view(b, t, h, dn)
            v = _norm(v.reshape(b, t, h * dv), a.gate_norm, attn.v_norm).view(b, t, h, dv)
        else:
            k_nope, v = _norm(k_nope, a.gate_norm, attn.k_norm), _norm(v, a.gate_norm, attn.v_norm)
    k_rope = attn.rotary(k_rope, 0)
    q_nope, q_rope = q[..., :dn], attn.rotary(q[..., dn:].transpose(1, 2), 0).transpose(1, 2)
    score = torch.einsum("bthd,bshd->bhts", q_nope, k_nope) + torch.einsum("bthr,bsr->bhts", q_rope, k_rope)
    score = (score * (dn + dr) ** -0.5).masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    y = torch.einsum("bhts,bshv->bthv", score.softmax(-1), v)
    return y.reshape(b, t, h * dv) @ attn.wo.weight.T


CASES = {
    "content_multiply_head": dict(),
    "content_add_head": dict(gate_combine="add"),
    "content_multiply_vector": dict(gate_norm_scope="vector"),
    "content_add_vector_shared_rms": dict(
        gate_combine="add", gate_norm_scope="vector", gate_kv="shared", gate_norm="rmsnorm"
    ),
    "latent_add": dict(gate_on="latent", gate_combine="add"),
}


def _layer_inputs(model, seed: int = 0):
    torch.manual_seed(seed)
    return torch.randn(2, 11, model.cfg.d_model, dtype=torch.float64), torch.randint(0, 97, (2, 11))


@pytest.mark.parametrize("case", CASES)
def test_layer_equals_the_written_out_computation(case):
    model = small_model(dict(variant="egmla") | CASES[case]).double()
    attn, table = model.blocks[1].attn, model.gate_table(1)
    with torch.no_grad():  # norms off their init, so that their affine is part of what is checked
        for p in attn.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    x, ids = _layer_inputs(model)
    expected = reference_layer(attn, table, x, ids, model.cfg.attention)
    torch.testing.assert_close(attn(x, ids, gate_table=table), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gate_on", ["content", "latent"])
def test_add_has_multiplys_parameters_but_not_its_function(gate_on):
    """Same parameter names, shapes and count; on the very same weights the outputs differ."""
    multiply = small_model(dict(variant="egmla", gate_on=gate_on))
    add = Transformer(small_config(dict(variant="egmla", gate_on=gate_on, gate_combine="add"))).eval()
    add.load_state_dict(multiply.state_dict(), strict=True)
    assert accounting.param_counts(add.cfg) == accounting.param_counts(multiply.cfg)
    assert sum(p.numel() for p in add.parameters()) == sum(p.numel() for p in multiply.parameters())
    assert accounting.flops_per_token(add.cfg) == accounting.flops_per_token(multiply.cfg)
    ids = torch.randint(0, 97, (2, 16))
    assert (add(ids) - multiply(ids)).abs().max() > 1e-2


def test_egmla_add_config_is_egmla_with_the_gate_added():
    """attention=egmla_add: EG-MLA's 120m parameters, KV and id bytes exactly, its own run-name tag."""
    eg, add = compose(["model=120m", "attention=egmla"]), compose(["model=120m", "attention=egmla_add"])
    assert add.attention.name == "egmla-kv64-g256-add" != eg.attention.name
    assert model_config(add).attention.gate_combine == "add" and model_config(eg).attention.gate_combine == "multiply"
    for f in (accounting.param_counts, accounting.kv_bytes_per_token, accounting.id_bytes_per_token):
        assert f(add) == f(eg)
    with torch.device("meta"):
        assert sum(p.numel() for p in build_model(add).parameters()) == accounting.param_counts(eg)["total"]


@pytest.mark.parametrize("combine", ["multiply", "add"])
@pytest.mark.parametrize("activation", ["none", "silu"])
@pytest.mark.parametrize("gate_on", ["content", "latent"])
def test_identity_init_starts_as_the_gate_free_layer(combine, activation, gate_on):
    knobs = dict(
        variant="egmla",
        gate_init="identity",
        gate_combine=combine,
        gate_activation=activation,
        gate_on=gate_on,
        gate_rope_key=True,
    )
    model = small_model(knobs).double()
    attn, table = model.blocks[2].attn, model.gate_table(2)
    gate, rope_gate = attn.gate(table.weight)  # every token of the vocabulary
    identity = 1.0 if combine == "multiply" else 0.0
    tol = 1e-15 if activation == "none" or combine == "add" else 1e-7  # silu(1.2784645) == 1 to fp32 rounding
    torch.testing.assert_close(gate, torch.full_like(gate, identity), rtol=0, atol=tol)
    torch.testing.assert_close(rope_gate, torch.full_like(rope_gate, identity), rtol=0, atol=tol)
    x, ids = _layer_inputs(model)
    expected = reference_layer(attn, table, x, ids, model.cfg.attention, gated=False)
    torch.testing.assert_close(attn(x, ids, gate_table=table), expected, rtol=1e-10, atol=1e-12 + 10 * tol)
    assert table.weight[:, 1:].std() > 0.5  # the tables keep their N(0, 1) rows beside the constant column


@pytest.mark.parametrize("combine", ["multiply", "add"])
def test_identity_init_lets_gradients_reach_table_and_w_ue(combine):
    """multiply: both at once (W_ue reads the tables' constant column); add: W_ue is all zero at init, so the
    tables get gradients from the second step, once W_ue has moved."""
    model = small_model(dict(variant="egmla", gate_init="identity", gate_combine=combine)).train()
    ids = torch.randint(0, 97, (2, 16))
    up, table = model.blocks[0].attn.gate.up.weight, model.gate_tables[0].weight

    def grads():
        model.zero_grad()
        model(ids).logsumexp(-1).mean().backward()
        return up.grad.abs().max().item(), table.grad[ids.unique()].abs().max().item()

    up_grad, table_grad = grads()
    assert up_grad > 1e-6
    assert (table_grad > 1e-6) if combine == "multiply" else (table_grad == 0.0)
    with torch.no_grad():
        up.sub_(up.grad)
    assert grads()[1] > 1e-6


def test_identity_init_serves_the_fused_decode():
    """identity is an init only: the fused decode (PyTorch reference) still equals the unfused one."""
    model = small_model(dict(variant="egmla", gate_init="identity")).double()
    with torch.no_grad():
        model.blocks[0].attn.gate.up.weight.add_(0.1)  # off the init, so that the gate varies by token
    ids = torch.randint(0, 97, (2, 12))
    cache = model.new_cache(2, 12)
    model(ids[:, :8], cache)
    unfused = [model(ids[:, t : t + 1], cache) for t in range(8, 12)]
    model.enable_fused_decode("embedding", backend="reference")
    cache = model.new_cache(2, 12)
    model(ids[:, :8], cache)
    fused = [model(ids[:, t : t + 1], cache) for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(fused, 1), torch.cat(unfused, 1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ("egmla_add", "the fused decode multiplies the gate; attention.gate_combine=add"),
        ("egmla_vector", "the fused decode norms per head; attention.gate_norm_scope=vector"),
    ],
)
def test_fused_decode_refuses_add_and_vector(variant, message):
    with pytest.raises(ValueError, match=message):
        small_model(variant).enable_fused_decode("table", backend="reference")


def test_fused_expand_refuses_a_hand_edited_add_layer(monkeypatch):
    """The config refuses fused_expand with add; a layer switched by hand fails before any kernel runs."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # past the CUDA check, on a CPU
    model = small_model("egmla_add").train()
    model.blocks[0].attn.fused_expand = True
    with pytest.raises(ConfigError, match="fused_expand=true multiplies the gate and norms per head"):
        model(torch.randint(0, 97, (1, 8)))


def test_scope_is_ignored_without_a_norm_and_on_the_latent():
    """gate_norm=none or gate_on=latent: vector is accepted and changes nothing (same modules)."""
    for knobs in (dict(gate_norm="none"), dict(gate_on="latent")):
        head = small_model(dict(variant="egmla") | knobs)
        vector = Transformer(small_config(dict(variant="egmla", gate_norm_scope="vector") | knobs)).eval()
        vector.load_state_dict(head.state_dict(), strict=True)
        ids = torch.randint(0, 97, (2, 10))
        torch.testing.assert_close(vector(ids), head(ids), rtol=0, atol=0)


POW2 = [
    "attention=egmla",
    "attention.qk_nope_head_dim=16",
    "attention.qk_rope_head_dim=16",
    "attention.v_head_dim=16",
    "attention.kv_lora_rank=16",
    "attention.gate_dim=16",
]
BAD = [
    (
        ["attention=egmla", "attention.gate_combine=concat"],
        "attention.gate_combine='concat' is invalid: expected one of multiply, add",
    ),
    (
        ["attention=egmla", "attention.gate_init=zeros"],
        "attention.gate_init='zeros' is invalid: expected one of normal, identity",
    ),
    (
        ["attention=egmla", "attention.gate_norm_scope=layer"],
        "attention.gate_norm_scope='layer' is invalid: expected one of head, vector",
    ),
    (
        ["attention=egmla", "attention.gate_init=identity", "attention.gate_activation=sigmoid"],
        "attention.gate_init='identity' is invalid: a sigmoid gate never reaches the identity",
    ),
    (
        [*POW2, "attention.fused_expand=true", "attention.gate_combine=add"],
        "attention.gate_combine='add' is invalid: fused_expand multiplies the gate; set fused_expand=false",
    ),
    (
        ["attention=egmla_add", *POW2[1:], "attention.fused_expand=true"],
        "attention.gate_combine='add' is invalid: fused_expand multiplies the gate",
    ),
    (
        [*POW2, "attention.fused_expand=true", "attention.gate_norm_scope=vector"],
        "attention.gate_norm_scope='vector' is invalid: fused_expand norms per head; set fused_expand=false",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_invalid_gate_options_give_one_clear_error(overrides, message):
    with pytest.raises(ConfigError) as info:
        build_model(compose(overrides))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_fused_expand_accepts_vector_scope_without_a_norm():
    cfg = model_config(
        compose([*POW2, "attention.fused_expand=true", "attention.gate_norm_scope=vector", "attention.gate_norm=none"])
    )
    assert not cfg.vector_norm
