"""Composition of the real conf/ tree, the public surface, and one clear error per invalid configuration."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

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


# ------------------------------------------------------------------------------------------------ run names


@pytest.mark.parametrize(
    ("size", "names"),
    [
        ("120m", ["mha", "gqa4", "mqa", "mla-kv256", "egmla-kv64-g256"]),
        ("tiny", ["mha", "gqa2", "mqa", "mla-kv64", "egmla-kv16-g32"]),
    ],
)
def test_default_attention_names_are_unchanged(size, names):
    for attention, name in zip(ATTENTIONS, names, strict=True):
        cfg = compose([f"model={size}", f"attention={attention}"])
        assert (cfg.attention.name, cfg.run_name, cfg.run_dir) == (name, f"{size}-{name}", f"runs/{size}-{name}")


NAMED = [
    (["attention=egmla", "attention.gate_on=latent"], "egmla-kv64-g256-lat"),
    (
        [
            "attention=egmla",
            "attention.gate_activation=sigmoid",
            "attention.gate_norm=rmsnorm",
            "attention.gate_kv=shared",
            "attention.gate_rope_key=true",
            "attention.gate_group_size=2",
        ],
        "egmla-kv64-g256-sig-rms-shkv-rk-grp2",
    ),
    (["attention=egmla", "attention.gate_activation=silu", "attention.gate_norm=none"], "egmla-kv64-g256-silu-nonorm"),
    (["attention=egmla", "attention.gate_enabled=false"], "egmla-kv64-g256-nogate"),
    (["attention=egmla", "attention.kv_lora_rank=16", "attention.gate_dim=128"], "egmla-kv16-g128"),  # in the base
    (["attention=egmla", "attention.fused_expand=true"], "egmla-kv64-g256"),  # a kernel choice: the same function
    (["attention=egmla", "attention.qk_rope_head_dim=32"], "egmla-kv64-g256-rope32"),
    (["attention=mla", "attention.absorb=true", "attention.q_lora_rank=128"], "mla-kv256-q128-abs"),
    (["attention=gqa", "attention.n_kv_heads=6", "attention.head_dim=32"], "gqa6-hd32"),
    (["attention=egmla", "attention.gate_combine=add"], "egmla-kv64-g256-add"),
    (["attention=egmla_add"], "egmla-kv64-g256-add"),  # the control's own file: its name, no second tag
    (
        ["attention=egmla", "attention.gate_init=identity", "attention.gate_norm_scope=vector"],
        "egmla-kv64-g256-idinit-vecnorm",
    ),
    (["attention=egmla", "+attention.gate_foo=x/y"], "egmla-kv64-g256-gate_foo-x_y"),  # any other knob: key-value
    (["attention=egmla", "attention.gate_on=latent", "attention.name=mine"], "mine"),  # a name given is kept
    (["experiment=table1_120m/egmla_kv16", "attention.gate_on=latent"], "egmla-kv16-g256-lat"),
]


@pytest.mark.parametrize(("overrides", "name"), NAMED, ids=[" ".join(o) for o, _ in NAMED])
def test_attention_name_tags_every_knob_off_its_default(overrides, name):
    cfg = compose(["model=120m", *overrides])
    assert cfg.attention.name == name
    assert cfg.run_name.endswith(f"-{name}")


def test_defaults_are_the_sizes_own():
    """A knob at its size's default has no tag; the 120m value at tiny (and tiny's at 120m) does."""
    tiny = ["model=tiny", "attention=egmla"]
    assert compose([*tiny, "attention.qk_rope_head_dim=16"]).attention.name == "egmla-kv16-g32"
    assert compose([*tiny, "attention.qk_rope_head_dim=64"]).attention.name == "egmla-kv16-g32-rope64"
    assert compose(["model=120m", "attention=gqa", "attention.n_kv_heads=2"]).attention.name == "gqa2"


def _grid(space: dict[str, list]) -> list[dict]:
    configs = [{}]
    for key, values in space.items():
        configs = [c | {key: v} for c in configs for v in values]
    return configs


GRIDS = {  # knob values around each file's 120m defaults
    "egmla": {
        "gate_enabled": [True, False],
        "gate_on": ["content", "latent"],
        "gate_activation": ["none", "sigmoid", "silu"],
        "gate_norm": ["layernorm", "rmsnorm", "none"],
        "gate_kv": ["separate", "shared"],
        "gate_rope_key": [False, True],
        "gate_group_size": [1, 2],
        "absorb": [False, True],
        "q_lora_rank": [None, 32],
        "qk_rope_head_dim": [64, 32],
        "fused_expand": [False, True],
    },
    "mla": {
        "q_lora_rank": [None, 64, 128],
        "absorb": [False, True],
        "qk_nope_head_dim": [64, 32],
        "qk_rope_head_dim": [64, 32],
        "v_head_dim": [64, 128],
    },
    "gqa": {"head_dim": [None, 32, 64]},
}


@pytest.mark.parametrize("attention", list(GRIDS))
def test_distinct_configurations_get_distinct_names(attention):
    """Over every combination of the knobs: two names are equal exactly when the configurations are (fused_expand
    aside), and compose gives the same names (a few checked through the real conf tree, twice)."""
    from egmla.config import NAME_IGNORED, attention_name_tags

    cfg = compose(["model=120m", f"attention={attention}"])
    defaults = OmegaConf.to_container(cfg.attention, resolve=True)
    names: dict[str, set] = {}
    for knobs in _grid(GRIDS[attention]):
        name = "-".join([cfg.attention.name, *attention_name_tags(defaults | knobs, defaults)])
        function = frozenset((k, v) for k, v in (defaults | knobs).items() if k not in NAME_IGNORED)
        names.setdefault(name, set()).add(function)
    assert all(len(functions) == 1 for functions in names.values())
    assert len(names) == len(_grid({k: v for k, v in GRIDS[attention].items() if k not in NAME_IGNORED}))
    for knobs in _grid(GRIDS[attention])[1::2999]:
        overrides = ["model=120m", f"attention={attention}", *(f"attention.{k}={v}" for k, v in knobs.items())]
        overrides = [o.replace("None", "null") for o in overrides]
        composed = {compose(overrides).attention.name for _ in range(2)}
        expected = "-".join([cfg.attention.name, *attention_name_tags(defaults | knobs, defaults)])
        assert composed == {expected}


def test_table_labels_tell_latent_and_content_gates_apart(tmp_path):
    from egmla import report

    for gate_on in ("content", "latent"):
        cfg = compose(["model=120m", "attention=egmla", f"attention.gate_on={gate_on}"])
        run = tmp_path / cfg.run_name
        run.mkdir()
        resolved = OmegaConf.to_container(cfg, resolve=True)
        (run / "results.json").write_text(json.dumps({"run_name": cfg.run_name, "config": resolved}))
    rows = [r.row for r in report.collect([tmp_path])]
    assert sorted((r["attention"], r["run"]) for r in rows) == [
        ("egmla-kv64-g256", "120m-egmla-kv64-g256"),
        ("egmla-kv64-g256-lat", "120m-egmla-kv64-g256-lat"),
    ]
