import math

import pytest
import torch

import qgraph
from qgraph.models import tiny_causal_lm
from qgraph.train import train_causal_lm


def fixed_batches(steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, 256, (4, 16), generator=generator)
    return [batch] * steps


def test_loss_falls_and_mode_comes_back():
    qm = qgraph.transform(tiny_causal_lm("llama"), "lrqat-w4", rank=4)
    qm.eval()
    optimizer = torch.optim.AdamW(qgraph.param_groups(qm, lr_ab=1e-2, lr_s=1e-3))
    losses = train_causal_lm(qm, fixed_batches(8), optimizer, steps=8)
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.05
    assert not qm.training


def test_non_finite_loss_stops_with_advice_and_restores_mode():
    model = tiny_causal_lm("llama")
    model.train()
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        train_causal_lm(model, fixed_batches(2), optimizer, steps=2)
    assert model.training
