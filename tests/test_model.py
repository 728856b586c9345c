"""Behaviour of the transformer for every attention variant: causality, decode == full forward, generate."""

from __future__ import annotations

import pytest
import torch

from conftest import small_model


def test_causal_every_variant(variant):
    """Changing future tokens never changes earlier logits."""
    model = small_model(variant)
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (2, 20))
    changed = ids.clone()
    changed[:, 12:] = torch.randint(0, 97, (2, 8))
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3  # the future did change


def test_incremental_decode_matches_full_forward(variant):
    """Prefill a prompt, then feed tokens one (and several) at a time through the cache: same logits."""
    model = small_model(variant)
    torch.manual_seed(2)
    ids = torch.randint(0, 97, (2, 24))
    full = model(ids)
    cache = model.new_cache(batch=2, capacity=24)
    steps = [model(ids[:, :10], cache)]  # prefill
    steps += [model(ids[:, t : t + 1], cache) for t in range(10, 16)]  # one token at a time
    steps.append(model(ids[:, 16:24], cache))  # a chunk continuing a cached context
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)
    assert cache.length == 24


def test_last_only_prefill_fills_the_same_cache_and_gives_the_last_logits(variant):
    """last_only (prefilling a prompt) returns the last position's logits and leaves the cache as a full pass."""
    model = small_model(variant)
    torch.manual_seed(4)
    ids = torch.randint(0, 97, (2, 12))
    full_cache, last_cache = model.new_cache(batch=2, capacity=13), model.new_cache(batch=2, capacity=13)
    full = model(ids, full_cache)
    last = model(ids, last_cache, last_only=True)
    assert last.shape == (2, 1, full.shape[-1])
    torch.testing.assert_close(last, full[:, -1:], rtol=0, atol=1e-6)
    step = torch.randint(0, 97, (2, 1))
    torch.testing.assert_close(model(step, last_cache), model(step, full_cache), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="the loss needs every position"):
        model(ids, targets=ids, last_only=True)


def test_generate_greedy_is_argmax_of_full_forward(variant):
    """generate() at temperature 0 picks, at every step, the argmax of a fresh full forward pass."""
    model = small_model(variant)
    torch.manual_seed(3)
    prompt = torch.randint(0, 97, (2, 5))
    out = model.generate(prompt, max_new_tokens=6)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
    expected = prompt
    for _ in range(6):
        expected = torch.cat([expected, model(expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)


def test_generate_sampling_respects_top_k():
    model = small_model("egmla")
    prompt = torch.randint(0, 97, (4, 3))
    torch.manual_seed(0)
    out = model.generate(prompt, max_new_tokens=1, temperature=1.0, top_k=1)
    assert torch.equal(out[:, -1:], model(prompt)[:, -1].argmax(-1, keepdim=True))


def test_decode_beyond_capacity_is_a_clear_error():
    model = small_model("mla")
    cache = model.new_cache(batch=1, capacity=4)
    model(torch.zeros(1, 4, dtype=torch.long), cache)
    try:
        model(torch.zeros(1, 1, dtype=torch.long), cache)
    except ValueError as exc:
        assert "holds 4 tokens" in str(exc)
    else:
        raise AssertionError("decoding past the cache's capacity must fail")


def test_padded_output_head_computes_the_unpadded_logits():
    """A GPT-2-sized vocabulary is padded for the matmul: logits and gradients are those of the plain head."""
    from egmla import build_model, compose

    vocab = 6417  # pads to 6464 (47 rows, under 1%), like GPT-2's 50,257 -> 50,304
    model = build_model(compose(["model=tiny", f"model.vocab_size={vocab}"]))
    h = torch.randn(2, 512, model.cfg.d_model, requires_grad=True)  # enough rows for the padded matmul
    padded = model.output_head(h)
    plain = h @ model.lm_head.weight.T
    assert padded.shape == (2, 512, vocab)
    torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-5)
    (grad_padded,) = torch.autograd.grad(padded.square().sum(), model.lm_head.weight)
    (grad_plain,) = torch.autograd.grad(plain.square().sum(), model.lm_head.weight)
    assert grad_padded.shape == (vocab, model.cfg.d_model)
    torch.testing.assert_close(grad_padded, grad_plain, rtol=1e-5, atol=1e-4)
