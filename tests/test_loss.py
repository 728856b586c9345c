"""The output head fused with cross-entropy (egmla.model.loss): the value and gradients of F.cross_entropy on the
full logits, computed chunk by chunk with the gradients in the forward pass, inside Transformer.forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from egmla import build_model, compose
from egmla.model.loss import linear_cross_entropy, padded_vocab

PADDED = 2037  # 2048 - 11: padded to 2048 from 1024 tokens on (11 rows, under 1%)


def reference(h, weight, targets, reduction="mean"):
    logits = h @ weight.T
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction=reduction)


def inputs(vocab, shape=(3, 367), d=16, dtype=torch.float32, seed=0):
    """h [*shape, d], weight [vocab, d], targets [*shape] with some ignored (-100)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, d, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, d, generator=g, dtype=dtype).mul(0.5).requires_grad_()
    targets = torch.randint(0, vocab, shape, generator=g)
    targets.view(-1)[::9] = -100
    return h, weight, targets


def test_padding_rule_is_the_output_heads():
    assert padded_vocab(PADDED, 1100) == 2048
    assert padded_vocab(PADDED, 1023) == PADDED  # a few rows: no copy of the weight
    assert padded_vocab(50257, 32768) == 50304
    assert padded_vocab(97, 4096) == 97  # 31 rows would be 32% more work
    assert padded_vocab(2048, 4096) == 2048


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("vocab", [97, 2048, PADDED])
@pytest.mark.parametrize("chunk", [7, 256, 8192])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_value_and_gradients_match_cross_entropy(dtype, vocab, chunk, reduction):
    h, weight, targets = inputs(vocab, dtype=dtype)  # 1101 tokens: 256 does not divide them
    expected = reference(h, weight, targets, reduction)
    expected_grads = torch.autograd.grad(expected, (h, weight))
    loss = linear_cross_entropy(h, weight, targets, reduction, chunk_tokens=chunk)
    grads = torch.autograd.grad(loss, (h, weight))
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    assert loss.dtype == expected.dtype and loss.shape == ()
    torch.testing.assert_close(loss, expected, **tol)
    for grad, want in zip(grads, expected_grads, strict=True):
        assert grad.dtype == dtype and grad.shape == want.shape
        torch.testing.assert_close(grad, want, **tol)


def test_backward_scales_the_forward_gradients_by_the_output_gradient():
    """The gradients are computed in the forward pass; backward must still honour what flows into the loss."""
    h, weight, targets = inputs(PADDED)
    expected = torch.autograd.grad(-3 * reference(h, weight, targets), (h, weight))
    got = torch.autograd.grad(-3 * linear_cross_entropy(h, weight, targets, chunk_tokens=300), (h, weight))
    for grad, want in zip(got, expected, strict=True):
        torch.testing.assert_close(grad, want, rtol=2e-5, atol=2e-6)


def test_no_logits_are_kept_for_the_backward_pass():
    h, weight, targets = inputs(PADDED)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = linear_cross_entropy(h, weight, targets, chunk_tokens=256)
    assert sum(saved) == h.numel() + 2048 * 16 + 1  # grad of h, of the padded weight, and the scale
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        frozen = linear_cross_entropy(h, weight.detach(), targets, chunk_tokens=256)
    assert sum(saved[-2:]) == h.numel() + 1  # no weight gradient kept for a frozen weight
    (grad,) = torch.autograd.grad(frozen, h)
    torch.testing.assert_close(grad, torch.autograd.grad(loss, h)[0])


def test_without_gradients_the_loss_is_the_same():
    h, weight, targets = inputs(PADDED)
    for reduction in ("mean", "sum"):
        expected = reference(h, weight, targets, reduction)
        with torch.no_grad():
            loss = linear_cross_entropy(h, weight, targets, reduction, chunk_tokens=300)
        assert loss.grad_fn is None
        torch.testing.assert_close(loss, expected.detach(), rtol=2e-5, atol=2e-6)
        detached = linear_cross_entropy(h.detach(), weight.detach(), targets, reduction, chunk_tokens=300)
        torch.testing.assert_close(detached, loss, rtol=0, atol=0)


def test_bf16_autocast_is_within_bf16_tolerance():
    """Matmuls in bf16 (the casts done once), softmax in fp32; gradients in the inputs' dtypes."""
    h, weight, targets = inputs(PADDED)
    expected = reference(h, weight, targets)
    expected_grads = torch.autograd.grad(expected, (h, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, weight, targets, chunk_tokens=300)
        plain = reference(h, weight, targets)  # what autocast does to the unfused path
    grads = torch.autograd.grad(loss, (h, weight))
    plain_grads = torch.autograd.grad(plain, (h, weight))
    assert loss.dtype == torch.float32 and grads[0].dtype == grads[1].dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=5e-3, atol=0)
    for grad, plain_grad, want in zip(grads, plain_grads, expected_grads, strict=True):
        error = (grad - want).norm() / want.norm()
        assert error < 1e-2 and error <= 1.5 * (plain_grad - want).norm() / want.norm()


def test_compiled_chunk_work_gives_the_same_result():
    h, weight, targets = inputs(97, shape=(2, 128))
    expected = linear_cross_entropy(h, weight, targets, chunk_tokens=64)
    expected_grads = torch.autograd.grad(expected, (h, weight))
    loss = linear_cross_entropy(h, weight, targets, chunk_tokens=64, compile=True)
    torch.testing.assert_close(loss, expected)
    for grad, want in zip(torch.autograd.grad(loss, (h, weight)), expected_grads, strict=True):
        torch.testing.assert_close(grad, want)


def test_unsupported_reduction_is_a_clear_error():
    h, weight, targets = inputs(97)
    with pytest.raises(ValueError, match="reduction='max' is not supported"):
        linear_cross_entropy(h, weight, targets, "max")
    with pytest.raises(ValueError, match="reduction='none' computes no gradients"):
        linear_cross_entropy(h, weight, targets, "none")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("vocab", [97, PADDED])
def test_per_token_losses_match_cross_entropy(dtype, vocab):
    """reduction="none": each target's loss, shaped like targets, 0 where ignored; padded head and a chunk
    size that does not divide the tokens; under bf16 autocast within bf16 tolerance."""
    h, weight, targets = inputs(vocab, dtype=dtype)
    expected = reference(h, weight, targets, "none").detach().view(targets.shape)
    with torch.no_grad():
        losses = linear_cross_entropy(h, weight, targets, "none", chunk_tokens=256)
    assert losses.shape == targets.shape and losses.dtype == expected.dtype and (losses[targets == -100] == 0).all()
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(losses, expected, **tol)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = linear_cross_entropy(h, weight, targets, "none", chunk_tokens=256)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16.double(), expected.double(), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("attention", ["mha", "egmla"])
def test_transformer_loss_matches_its_logits_with_tied_weights(attention):
    """model(ids, targets=t): the loss of model(ids)'s logits and every parameter's gradient, the tied
    embedding/head weight getting both of its uses; the padded head (1024 tokens) on both paths."""
    model = build_model(compose(["model=tiny", f"attention={attention}", f"model.vocab_size={PADDED}"]))
    assert model.lm_head.weight is model.embed.weight
    torch.manual_seed(0)
    ids = torch.randint(0, PADDED, (4, 257))
    inputs_, targets = ids[:, :-1], ids[:, 1:].clone()
    targets[0, :5] = -100
    expected = F.cross_entropy(model(inputs_).float().flatten(0, 1), targets.flatten())
    expected.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = model(inputs_, targets=targets)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    with torch.no_grad():
        total = model(inputs_, targets=targets, reduction="sum")
    torch.testing.assert_close(total / (targets != -100).sum(), expected.detach(), rtol=1e-5, atol=1e-6)


def test_targets_with_a_decode_cache_are_refused():
    model = build_model(compose(["model=tiny", "model.vocab_size=257"]))
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="targets and a decode cache"):
        model(ids, model.new_cache(1, 8), targets=ids)


def test_training_module_fused_and_plain_losses_agree():
    """train.fused_loss on and off: the same training losses over a few AdamW steps, and validation sums."""
    from omegaconf import OmegaConf

    from egmla.config import model_config
    from egmla.train.module import LanguageModel

    cfg = compose(["model=tiny", "attention=egmla", "model.vocab_size=257"])
    optim = OmegaConf.to_container(cfg.optim)
    losses = {}
    for fused in (True, False):
        torch.manual_seed(0)
        module = LanguageModel(model_config(cfg), optim | {"warmup_steps": 0}, 10, torch.ones(257), fused_loss=fused)
        optimizers = module.configure_optimizers()
        g = torch.Generator().manual_seed(1)
        batch, val_batch = torch.randint(0, 257, (2, 4, 33), generator=g)
        losses[fused] = []
        for _ in range(4):
            loss = module._loss(batch)
            loss.backward()
            optimizers["optimizer"].step()
            optimizers["optimizer"].zero_grad()
            optimizers["lr_scheduler"]["scheduler"].step()
            losses[fused].append(loss.item())
        with torch.no_grad():
            losses[fused].append(module._loss(val_batch, reduction="sum").item())
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert losses[True][3] < losses[True][0] - 0.1  # it did train
