"""The FLOPs/token formula (docs/design.md convention) agrees with torch's FLOP counter on a training step."""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import small_model
from egmla import accounting


def test_flops_per_token_within_2_percent_of_counted(variant):
    model = small_model(variant).train()
    batch, seq = 2, 48
    ids = torch.randint(0, 97, (batch, seq))
    # The math backend decomposes attention into matmuls the counter sees (CPU flash kernels are uncounted).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids).float().logsumexp(-1).mean().backward()
    counted = counter.get_total_flops() / (batch * seq)
    predicted = accounting.flops_per_token(model.cfg, seq)
    assert abs(predicted - counted) / counted < 0.02, (predicted, counted)
