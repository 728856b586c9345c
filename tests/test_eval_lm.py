"""The lm-eval adapter: scores equal a direct computation with our model and lm-eval's own HFLM on an equivalent
`transformers` Llama; generation equals model.generate cut at the stop string; load_run fails in one line; and
`lm_eval --model egmla` works from the command line through the start-up hook (.pth) without importing torch
at start-up."""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from conftest import WORDS, offline_env, run_training, write_jsonl
from egmla import ConfigError
from egmla.data.tokenizer import GPT2_EOS, build_tokenizer
from egmla.eval import lm_eval_plugin
from egmla.eval.lm import EgmlaLM
from egmla.eval.load import load_run
from egmla.model import AttentionConfig, ModelConfig, Transformer

MAX_LEN = 64  # the trained run's model.max_seq_len: small, so truncation and rolling windows are exercised
PTH = Path(lm_eval_plugin.__file__).with_name(lm_eval_plugin.PTH_NAME)


# --- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is as fast, and immune to the many-fold slowdown of OpenMP threads
    competing for a busy CPU (shared CI runners)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real (tiny, byte-level, EG-MLA) training run: config.yaml + checkpoints/last.ckpt + results.json."""
    root = tmp_path_factory.mktemp("eval_run")
    rng = random.Random(0)
    for name, n in (("train", 60), ("val", 10)):
        write_jsonl(root / f"{name}.jsonl", (" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(n)))
    run_training(
        [
            "model=tiny",
            "model.vocab_size=257",
            "model.n_layers=2",
            "model.d_model=64",
            "model.ffn_hidden=128",
            f"model.max_seq_len={MAX_LEN}",
            "attention=egmla",
            "data=local",
            f"data.data_files.train={root / 'train.jsonl'}",
            f"data.data_files.validation={root / 'val.jsonl'}",
            "data.tokenizer=bytes",
            "data.seq_len=32",
            "data.batch_size=4",
            "data.num_workers=0",
            "data.shuffle_window=4",
            f"run_dir={root / 'run'}",
            "train.max_steps=3",
            "train.val_every=3",
            "train.val_batches=1",
            "train.log_every=1",
            "train.ckpt_every=3",
            "optim.warmup_steps=1",
        ]
    )
    return root / "run"


@pytest.fixture(scope="module")
def loaded(run_dir):
    model, tokenizer, _ = load_run(run_dir)
    return model, tokenizer


def requests(kind: str, *args: tuple) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


# --- direct computations with our model -------------------------------------------------------------------


@torch.no_grad()
def token_logprobs(model: Transformer, inputs: list[int], targets: list[int]) -> torch.Tensor:
    """log p(targets[j] | inputs[: len(inputs) - len(targets) + j + 1]) for each j, from one full forward."""
    logits = model(torch.tensor([inputs]))[0, len(inputs) - len(targets) :]
    return F.log_softmax(logits.double(), dim=-1).gather(-1, torch.tensor(targets)[:, None]).squeeze(-1)


def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """The definition: trailing spaces of the context belong to the continuation; the continuation's tokens are
    those of context + continuation after the context's; an empty context is EOS; keep the last MAX_LEN inputs."""
    stripped = context.rstrip()
    whole = tokenizer.encode(context + continuation)
    n_context = len(tokenizer.encode(stripped)) if stripped else 0
    tokens = ([tokenizer.eos_id] if not stripped else []) + whole
    target = whole[n_context:]
    inputs = tokens[:-1][-MAX_LEN:]
    with torch.no_grad():
        logits = model(torch.tensor([inputs]))[0, -len(target) :]
    greedy = logits.argmax(-1).tolist() == target
    return float(token_logprobs(model, inputs, target).sum()), greedy


def direct_rolling(model, tokens: list[int], eos: int, max_len: int) -> float:
    """Every token predicted once, by windows of max_len predictions, each window with max_len tokens of input
    (as many as exist); the text starts after EOS."""
    seq = [eos, *tokens]  # seq[j] predicts tokens[j] == seq[j + 1]
    total, start = 0.0, 0
    while start < len(tokens):
        end = min(start + max_len, len(tokens))  # this window predicts tokens[start:end]
        total += float(token_logprobs(model, seq[max(0, end - max_len) : end], tokens[start:end]).sum())
        start = end
    return total


# --- the adapter against direct computations --------------------------------------------------------------

LONG = " ".join(WORDS * 3)  # ~300 bytes: far beyond MAX_LEN
LL_REQUESTS = [
    ("The cat sat on", " the mat"),
    ("Question: is it? Answer:", " yes"),
    ("Question: is it? Answer:", " no"),  # shares all but its last token with the one before: one forward for both
    ("Trailing space ", "moves"),  # lm-eval moves the space into the continuation
    ("", "hello there"),  # empty context: conditioned on EOS
    (LONG, " and the end"),  # context truncated from the left to MAX_LEN - 1 + continuation
    ("x", LONG[: MAX_LEN - 4]),  # a continuation nearly as long as the model's context
    ("ab cd", " ef"),  # the same tokens as the next request but cut elsewhere: they share one forward, and the
    ("ab", " cd ef"),  # shorter continuation reads the trailing log-probs (HFLM 0.4.13 gathers the leading ones)
]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_loglikelihood_matches_direct_computation(loaded, batch_size):
    model, tokenizer = loaded
    lm = EgmlaLM(model, tokenizer, batch_size=batch_size)
    got = lm.loglikelihood(requests("loglikelihood", *LL_REQUESTS), disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(LL_REQUESTS, got, strict=True):
        expected, expected_greedy = direct_loglikelihood(model, tokenizer, context, continuation)
        assert logprob == pytest.approx(expected, abs=1e-4), (context[:20], continuation[:20])
        assert greedy == expected_greedy
    assert all(logprob < 0 for logprob, _ in got)


def test_a_continuation_longer_than_max_length_is_scored_in_pieces(loaded):
    """Each piece of max_length tokens is conditioned on the max_length tokens before its last target."""
    model, tokenizer = loaded
    context, continuation = "A story:", " the fox ran over the hill and far away, " * 4  # 160 byte tokens
    ctx, cont = tokenizer.encode(context), tokenizer.encode(continuation)
    assert len(cont) > 2 * MAX_LEN
    expected = 0.0
    for start in range(0, len(cont), MAX_LEN):
        piece = cont[start : start + MAX_LEN]
        inputs = (ctx + cont[: start + len(piece)])[:-1][-MAX_LEN:]
        expected += float(token_logprobs(model, inputs, piece).sum())
    [(logprob, greedy)] = EgmlaLM(model, tokenizer, batch_size=2).loglikelihood(
        requests("loglikelihood", (context, continuation))
    )
    assert logprob == pytest.approx(expected, abs=1e-3) and greedy is False


def test_is_greedy_true_for_the_greedy_continuation(loaded):
    model, tokenizer = loaded
    context = "the of and"
    greedy = tokenizer.decode(model.generate(torch.tensor([tokenizer.encode(context)]), 5)[0, -5:])
    [(_, is_greedy), (_, other)] = EgmlaLM(model, tokenizer).loglikelihood(
        requests("loglikelihood", (context, greedy), (context, "\x01" + greedy[1:])), disable_tqdm=True
    )
    assert is_greedy and not other


def test_loglikelihood_rolling_matches_direct_sum(loaded):
    model, tokenizer = loaded
    short, long = "the cat sat on the mat", " ".join(WORDS * 3)
    assert len(tokenizer.encode(short)) < MAX_LEN < 3 * MAX_LEN < len(tokenizer.encode(long))
    lm = EgmlaLM(model, tokenizer, batch_size=2)
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (short,), (long,), ("",)), disable_tqdm=True)
    ids = tokenizer.encode(short)
    assert got[0] == pytest.approx(float(token_logprobs(model, [tokenizer.eos_id, *ids[:-1]], ids).sum()), abs=1e-4)
    assert got[1] == pytest.approx(direct_rolling(model, tokenizer.encode(long), tokenizer.eos_id, MAX_LEN), abs=1e-3)
    assert got[2] == 0.0
    # a shorter max_length means less context per prediction: a different (and here rolling) sum
    short_window = EgmlaLM(model, tokenizer, max_length=16).loglikelihood_rolling(
        requests("loglikelihood_rolling", (short,)), disable_tqdm=True
    )
    assert short_window[0] == pytest.approx(direct_rolling(model, ids, tokenizer.eos_id, 16), abs=1e-4)


# --- generation -------------------------------------------------------------------------------------------


def test_generate_until_is_greedy_generate_cut_at_the_stop(loaded):
    model, tokenizer = loaded
    contexts = ["the of and to", "he", "they were at the one that was"]  # different lengths share one batch
    max_new = 12
    full = []
    for context in contexts:
        out = model.generate(torch.tensor([tokenizer.encode(context)]), max_new)[0, -max_new:]
        full.append(tokenizer.decode(out))
    stop = full[0][5:7]  # a string the first greedy continuation certainly contains
    gen_kwargs = {"until": [stop], "max_gen_toks": max_new, "do_sample": False}
    lm = EgmlaLM(model, tokenizer, batch_size=4)
    got = lm.generate_until(requests("generate_until", *[(c, dict(gen_kwargs)) for c in contexts]), disable_tqdm=True)
    expected = [text.split(stop)[0].split(GPT2_EOS)[0] for text in full]
    assert got == expected
    assert len(got[0]) < len(full[0])
    # one at a time gives the same
    single = EgmlaLM(model, tokenizer, batch_size=1).generate_until(
        requests("generate_until", *[(c, dict(gen_kwargs)) for c in contexts]), disable_tqdm=True
    )
    assert single == got


def test_generate_until_without_stop_runs_to_max_gen_toks(loaded):
    model, tokenizer = loaded
    ids = tokenizer.encode("the of")
    expected = tokenizer.decode(model.generate(torch.tensor([ids]), 7)[0, len(ids) :]).split(GPT2_EOS)[0]
    [got] = EgmlaLM(model, tokenizer).generate_until(
        requests("generate_until", ("the of", {"until": [], "max_gen_toks": 7})), disable_tqdm=True
    )
    assert got == expected


def test_generate_until_refuses_a_generation_longer_than_the_model(loaded):
    model, tokenizer = loaded
    with pytest.raises(ValueError, match="max_gen_toks=64 leaves no room"):
        EgmlaLM(model, tokenizer).generate_until(requests("generate_until", ("a", {"max_gen_toks": 64})))


# --- against lm-eval's own HFLM on an equivalent transformers Llama ---------------------------------------

HF_MAX_LEN = 48
HF_REQUESTS = [
    ("The capital of France is", " Paris"),
    ("Question: which letter? Answer:", " A"),  # one-token answers sharing a context: HFLM's logits cache
    ("Question: which letter? Answer:", " B"),
    ("Trailing space ", "is moved into the continuation"),
    ("", "An empty context is conditioned on the prefix token"),
    (" ".join(["To be, or not to be, that is the question:"] * 8), " whether 'tis nobler"),  # > HF_MAX_LEN tokens
]


def _unit_scale(model: Transformer, seed: int = 0) -> None:
    """Weights at unit scale (matrices N(0, 1/fan_in), gains 1 + N(0, 0.1)): the default 0.02 init gives near-
    uniform next-token distributions, which would let almost any scoring bug pass."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(noise * p.shape[1] ** -0.5 if p.ndim == 2 else 1 + 0.1 * noise)


def _llama_copy(model: Transformer):
    """A LlamaForCausalLM that computes the same function as our GQA model (weights copied)."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    c = model.cfg
    config = llama.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.d_model,
        intermediate_size=c.ffn_hidden,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.kv_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=c.tie_embeddings,
        max_position_embeddings=c.max_seq_len,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=None,
        eos_token_id=50256,
    )
    ref = llama.LlamaForCausalLM(config).eval()
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    for i in range(c.n_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        names |= {
            f"{ours}attn_norm.weight": f"{theirs}input_layernorm.weight",
            f"{ours}mlp_norm.weight": f"{theirs}post_attention_layernorm.weight",
        }
        names |= {f"{ours}attn.w{n}.weight": f"{theirs}self_attn.{n}_proj.weight" for n in "qkvo"}
        names |= {f"{ours}mlp.w_{n}.weight": f"{theirs}mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
    ours_params, ref_params = dict(model.named_parameters()), dict(ref.named_parameters())
    assert set(names) == set(ours_params) and set(names.values()) == set(ref_params)  # tied lm_head: one tensor
    with torch.no_grad():
        for ours, theirs in names.items():
            ref_params[theirs].copy_(ours_params[ours])
    return ref


def test_matches_lm_eval_hflm_on_an_equivalent_llama():
    from lm_eval.models.huggingface import HFLM
    from transformers import PreTrainedTokenizerFast

    from egmla.data.tokenizer import _gpt2_encoder

    torch.manual_seed(0)
    attention = AttentionConfig(variant="gqa", n_kv_heads=2)
    cfg = ModelConfig(
        vocab_size=50257,
        n_layers=2,
        d_model=32,
        n_heads=4,
        ffn_hidden=64,
        max_seq_len=HF_MAX_LEN,
        rope_theta=5000.0,
        norm_eps=1e-5,
        attention=attention,
    )
    model = Transformer(cfg).eval()
    _unit_scale(model)
    llama = _llama_copy(model)
    ids = torch.randint(0, 50257, (2, HF_MAX_LEN))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), llama(ids).logits, rtol=1e-4, atol=1e-4)

    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=_gpt2_encoder("tokenizers"), eos_token=GPT2_EOS)
    hflm = HFLM(pretrained=llama, tokenizer=hf_tokenizer, batch_size=4, max_length=HF_MAX_LEN)
    ours = EgmlaLM(model, build_tokenizer("gpt2"), batch_size=4)
    assert ours.max_length == hflm.max_length == HF_MAX_LEN
    assert ours.prefix_token_id == hflm.prefix_token_id == 50256

    theirs_ll = hflm.loglikelihood(requests("loglikelihood", *HF_REQUESTS), disable_tqdm=True)
    ours_ll = ours.loglikelihood(requests("loglikelihood", *HF_REQUESTS), disable_tqdm=True)
    for request, (a, greedy_a), (b, greedy_b) in zip(HF_REQUESTS, ours_ll, theirs_ll, strict=True):
        assert a == pytest.approx(b, abs=1e-3), request
        assert greedy_a == greedy_b
    assert len({round(a, 3) for a, _ in ours_ll}) == len(HF_REQUESTS)  # distinct, meaningful numbers

    # Not a repeated sentence: windows of a periodic text can coincide and share a forward, where HFLM 0.4.13
    # reads the leading instead of the trailing log-probs for the shorter window (see LL_REQUESTS).
    words = "all the world's a stage and men women merely players they have their exits entrances".split()  # noqa: SIM905
    texts = [("A short text.",), (" ".join(random.Random(1).choice(words) for _ in range(120)),)]
    assert len(ours.tok_encode(texts[1][0])) > 2 * HF_MAX_LEN
    theirs_rolling = hflm.loglikelihood_rolling(requests("loglikelihood_rolling", *texts), disable_tqdm=True)
    ours_rolling = ours.loglikelihood_rolling(requests("loglikelihood_rolling", *texts), disable_tqdm=True)
    assert ours_rolling == pytest.approx(theirs_rolling, abs=1e-3)


# --- load_run ---------------------------------------------------------------------------------------------


def test_load_run_restores_the_trained_weights(run_dir, loaded):
    model, tokenizer = loaded
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert torch.equal(model.embed.weight, ckpt["state_dict"]["model.embed.weight"])
    assert tokenizer.name == "bytes" and not model.training and model.cfg.max_seq_len == MAX_LEN
    direct, _, cfg = load_run(run_dir / "checkpoints" / "last.ckpt")  # a .ckpt path: config from its run dir
    assert cfg.attention.variant == "egmla"
    assert all(
        torch.equal(a, b) for a, b in zip(direct.state_dict().values(), model.state_dict().values(), strict=True)
    )


def _one_line_error(path, fragment: str, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_run(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    assert fragment in message, message
    return message


def test_load_run_errors_are_one_line(run_dir, tmp_path):
    missing = tmp_path / "no_such_run"
    assert str(missing) in _one_line_error(missing, "does not exist")

    no_config = tmp_path / "no_config"
    shutil.copytree(run_dir / "checkpoints", no_config / "checkpoints")
    _one_line_error(no_config, "config.yaml is missing")

    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    shutil.copy(run_dir / "config.yaml", no_ckpt)
    _one_line_error(no_ckpt, "train it first")
    _one_line_error(run_dir, "checkpoints there: last.ckpt", checkpoint="step9999999.ckpt")

    truncated = (run_dir / "checkpoints" / "last.ckpt").read_bytes()[:4096]
    for name, content in (("garbage", b"not a checkpoint"), ("truncated", truncated)):
        corrupt = tmp_path / name
        (corrupt / "checkpoints").mkdir(parents=True)
        shutil.copy(run_dir / "config.yaml", corrupt)
        (corrupt / "checkpoints" / "last.ckpt").write_bytes(content)
        assert "retrain" in _one_line_error(corrupt, "is unreadable")

    other = tmp_path / "other_model"
    shutil.copytree(run_dir, other)
    (other / "config.yaml").write_text((run_dir / "config.yaml").read_text().replace("n_layers: 2", "n_layers: 1"))
    _one_line_error(other, "trained with another model")


def test_bad_model_args_are_one_line(run_dir):
    with pytest.raises(ConfigError, match="needs model_args checkpoint=RUN_DIR"):
        EgmlaLM.create_from_arg_string("device=cpu")
    with pytest.raises(ConfigError, match="model_args temperature not understood"):
        EgmlaLM.create_from_arg_string(f"checkpoint={run_dir},temperature=1")
    # model_args win over lm-eval's CLI options (which always carry batch_size)
    lm = EgmlaLM.create_from_arg_string(f"checkpoint={run_dir},batch_size=5,max_length=32", {"batch_size": 1})
    assert (lm.batch_size, lm.max_length, lm.device.type) == (5, 32, "cpu")


# --- `lm_eval --model egmla` from the command line ---------------------------------------------------------


def _site_dir_with_pth(tmp_path: Path) -> Path:
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    shutil.copy(PTH, site_dir)
    return site_dir


def _lm_eval_command(tmp_path: Path) -> list[str]:
    """The real `lm_eval` executable once `make setup` has installed the .pth file; until then the same start-up
    step (site processes the .pth file) followed by lm-eval's own CLI entry point in a fresh interpreter."""
    if (Path(sysconfig.get_paths()["purelib"]) / lm_eval_plugin.PTH_NAME).is_file():
        script = Path(sys.executable).with_name("lm_eval")
        return [str(script)] if script.is_file() else [sys.executable, "-m", "lm_eval"]
    site_dir = _site_dir_with_pth(tmp_path)
    code = f"import site, sys; site.addsitedir({str(site_dir)!r}); sys.argv[0] = 'lm_eval'; "
    code += "from lm_eval.__main__ import cli_evaluate; cli_evaluate()"
    return [sys.executable, "-c", code]


def _write_task(folder: Path) -> None:
    """A 5-question multiple-choice task read from a local jsonl file."""
    folder.mkdir()
    rows = [
        {"question": f"Is {w} a word?", "choices": [" yes", " no", " maybe"], "answer": i % 3}
        for i, w in enumerate(WORDS[:5])
    ]
    (folder / "tiny_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tiny_mc.yaml").write_text(
        "task: egmla_tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'tiny_mc.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}} Answer:'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n"
    )


PIQA_ROWS = [
    ("Dry a wet cup.", "Use a towel.", "Use a hose.", 0),
    ("Cut bread.", "Use a spoon.", "Use a knife.", 1),
    ("Open a jar.", "Twist the lid.", "Freeze it.", 0),
]


def _write_offline_data(root: Path) -> Path:
    """`make eval-data`'s layout with piqa's split only: the portable YAMLs of every offline task under
    root/tasks (placeholders, no absolute path), a 3-row piqa validation split in the arrow format."""
    import datasets

    from egmla.eval.offline_tasks import write_tasks

    rows = [{"goal": g, "sol1": a, "sol2": b, "label": y} for g, a, b, y in PIQA_ROWS]
    datasets.Dataset.from_list(rows).save_to_disk(str(root / "piqa" / "validation"))
    write_tasks(root, root / "tasks")
    return root / "tasks"


def test_lm_eval_command_line_runs_the_egmla_model(run_dir, tmp_path):
    """One `lm_eval` call: a task of a plain --include_path folder, and piqa_offline from a folder of portable
    YAMLs (as `make eval-data` writes), which lm-eval finds only because the hook renders that folder."""
    tasks = _write_offline_data(tmp_path / "eval")
    _write_task(tmp_path / "mine")
    shutil.copy(tmp_path / "mine" / "tiny_mc.yaml", tasks)  # its data path is absolute: used as it is
    out = tmp_path / "out"
    args = [
        "--model",
        "egmla",
        "--model_args",
        f"checkpoint={run_dir}",
        "--tasks",
        "egmla_tiny_mc,piqa_offline",
        "--include_path",
        str(tasks),
        "--limit",
        "5",
        "--batch_size",
        "4",
        "--output_path",
        str(out),
    ]
    env = offline_env(OMP_NUM_THREADS="1", HF_DATASETS_CACHE=str(tmp_path / "hf_cache"))
    proc = subprocess.run([*_lm_eval_command(tmp_path), *args], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "egmla_tiny_mc" in proc.stdout and "acc" in proc.stdout and "|" in proc.stdout, proc.stdout
    [results] = out.rglob("results_*.json")
    saved = json.loads(results.read_text())
    acc = saved["results"]["egmla_tiny_mc"]["acc,none"]
    assert 0 <= acc <= 1 and math.isfinite(acc)
    piqa = saved["results"]["piqa_offline"]
    assert saved["n-samples"]["piqa_offline"]["effective"] == len(PIQA_ROWS)  # all 3 local rows, nothing fetched
    assert piqa["acc,none"] in (0, 1 / 3, 2 / 3, 1) and "acc_norm,none" in piqa  # lm-eval's own piqa metrics
    assert "@HERE@" in (tasks / "piqa_offline.yaml").read_text()  # the folder itself stays portable


def test_startup_hook_is_lazy_and_keeps_lm_evals_models(tmp_path):
    """The .pth line imports neither torch nor egmla nor lm-eval; importing lm-eval's models adds "egmla" as a lazy
    name beside lm-eval's own, and our module is imported only when that name is looked up."""
    site_dir = _site_dir_with_pth(tmp_path)
    code = f"""
import site, sys
site.addsitedir({str(site_dir)!r})
heavy = [m for m in ("torch", "egmla", "lm_eval") if m in sys.modules]
assert not heavy, heavy
from lm_eval.api.registry import get_model, model_registry
assert "egmla" not in model_registry
get_model("dummy")  # lm-eval's lazy start: imports lm_eval.models, which fires our hook
assert model_registry._objs["egmla"] == "egmla.eval.lm:EgmlaLM" and "hf" in model_registry
assert "egmla.eval.lm" not in sys.modules and "torch" not in sys.modules
import lm_eval.tasks  # fires the other trigger: TaskManager renders portable folders, still without egmla
assert lm_eval.tasks.TaskManager.__init__.egmla_renders and "egmla" not in sys.modules
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_egmla_lm_eval_fallback_registers_then_runs_lm_evals_cli(monkeypatch, capsys):
    import lm_eval.__main__
    from lm_eval.api.registry import get_model, model_registry

    saved = dict(model_registry._objs)
    model_registry._objs.pop("egmla")
    seen = {}
    monkeypatch.setattr(
        lm_eval.__main__, "cli_evaluate", lambda: seen.update(model=get_model("egmla"), argv=sys.argv[:])
    )
    monkeypatch.setattr(sys, "argv", ["egmla-lm-eval", "--model", "egmla"])
    try:
        lm_eval_plugin.main()
    finally:
        model_registry._objs.clear()
        model_registry._objs.update(saved)
    assert seen == {"model": EgmlaLM, "argv": ["lm_eval", "--model", "egmla"]}

    def bad_checkpoint():
        EgmlaLM.create_from_arg_string("checkpoint=/no/such/run")

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", bad_checkpoint)
    with pytest.raises(SystemExit) as info:
        lm_eval_plugin.main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "/no/such/run does not exist" in err


def test_pth_file_install_and_uninstall(tmp_path, monkeypatch, capsys):
    assert PTH.read_text() == lm_eval_plugin.PTH_LINE  # the committed file is what `install` writes
    monkeypatch.setattr(lm_eval_plugin, "_site_packages", lambda: str(tmp_path))
    assert lm_eval_plugin._cli(["install"]) == 0
    assert (tmp_path / lm_eval_plugin.PTH_NAME).read_text() == lm_eval_plugin.PTH_LINE
    assert lm_eval_plugin._cli(["status"]) == 0 and ": installed" in capsys.readouterr().out
    assert lm_eval_plugin._cli(["uninstall"]) == 0 and not (tmp_path / lm_eval_plugin.PTH_NAME).exists()
    assert lm_eval_plugin._cli(["bogus"]) == 2
