"""The one next-token rule of Transformer.generate and the lm-eval adapter: greedy is the argmax, sampling
draws from softmax(logits / temperature) over the top k, checked against probabilities computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from egmla.eval import lm
from egmla.model import sampling, transformer
from egmla.model.sampling import sample_next_token

LOGITS = [2.0, 1.0, 0.5, 0.0, -1.0]
DRAWS = 50_000


def reference_probabilities(logits: list[float], temperature: float, top_k: int | None) -> list[float]:
    """exp(l / T) normalised over the top_k largest logits (all when None), 0 elsewhere: plain Python."""
    kept = sorted(logits, reverse=True)[: top_k or len(logits)]
    weights = [math.exp(x / temperature) if x >= kept[-1] else 0.0 for x in logits]
    return [w / sum(weights) for w in weights]


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_greedy_is_the_argmax(temperature):
    logits = torch.randn(16, 100, generator=torch.Generator().manual_seed(0))
    picked = sample_next_token(logits, temperature, top_k=5)
    assert picked.shape == (16,) and torch.equal(picked, logits.argmax(-1))


@pytest.mark.parametrize("temperature, top_k", [(0.7, 3), (1.0, None), (2.0, 2), (1.3, 50)])
def test_sampling_follows_the_tempered_top_k_softmax(temperature, top_k):
    """50,000 seeded draws; each token's frequency within 5 standard errors of its probability, and tokens
    outside the top k never drawn."""
    logits = torch.tensor(LOGITS).expand(DRAWS, -1)
    picked = sample_next_token(logits, temperature, top_k, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(picked, minlength=len(LOGITS)).tolist()
    for token, (count, p) in enumerate(zip(counts, reference_probabilities(LOGITS, temperature, top_k), strict=True)):
        if p == 0:
            assert count == 0, (token, count)
        else:
            assert abs(count / DRAWS - p) < 5 * math.sqrt(p * (1 - p) / DRAWS), (token, count / DRAWS, p)


def test_seeded_draws_repeat():
    logits = torch.randn(64, 30, generator=torch.Generator().manual_seed(2))
    first, again = (sample_next_token(logits, 1.0, 10, generator=torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(first, again)


def test_generate_and_the_lm_eval_adapter_share_the_sampler():
    assert transformer.sample_next_token is lm.sample_next_token is sampling.sample_next_token
    assert not hasattr(transformer, "_sample") and not hasattr(lm, "_pick")
