import itertools
import math

import numpy as np
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


def test_exactly_steps_steps_run_on_the_first_batches():
    qm = qgraph.transform(tiny_causal_lm("llama"), "lrqat-w4", rank=4)
    optimizer = torch.optim.AdamW(qm.trainable_parameters())
    assert len(train_causal_lm(qm, fixed_batches(3), optimizer, steps=1)) == 1
    assert len(train_causal_lm(qm, itertools.cycle(fixed_batches(1)), optimizer, steps=2)) == 2  # endless: stops
    assert train_causal_lm(qm, fixed_batches(1), optimizer, steps=0) == []
    assert len(train_causal_lm(qm, fixed_batches(1), optimizer, steps=np.int64(1))) == 1


def test_a_data_loader_over_a_stream_trains_its_steps():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(fixed_batches(1)[0])

    qm = qgraph.transform(tiny_causal_lm("llama"), "lrqat-w4", rank=4)
    loader = torch.utils.data.DataLoader(Stream(), batch_size=2)
    assert len(train_causal_lm(qm, loader, torch.optim.AdamW(qm.trainable_parameters()), steps=2)) == 2


@pytest.mark.parametrize(("steps", "batches", "message"), [
    (-1, 1, "steps must be an integer >= 0, got -1"),
    ("2", 2, "steps must be an integer >= 0, got '2'"),
    (5, 2, "5 steps need 5 batches, got 2"),
])
def test_steps_that_cannot_run_are_refused_before_any_step(steps, batches, message):
    qm = qgraph.transform(tiny_causal_lm("llama"), "lrqat-w4", rank=4)
    before = [p.detach().clone() for p in qm.trainable_parameters()]
    with pytest.raises(ValueError, match=message):
        train_causal_lm(qm, fixed_batches(batches), torch.optim.SGD(qm.trainable_parameters(), lr=1.0), steps=steps)
    assert all(torch.equal(a, b) for a, b in zip(before, qm.trainable_parameters()))


def test_an_iterator_that_runs_out_says_after_how_many_steps():
    qm = qgraph.transform(tiny_causal_lm("llama"), "lrqat-w4", rank=4)
    with pytest.raises(ValueError, match="the batches ran out after 2 of 3 steps"):
        train_causal_lm(qm, iter(fixed_batches(2)), torch.optim.AdamW(qm.trainable_parameters()), steps=3)


@pytest.mark.parametrize("optimizer", [None, "params", torch.optim.AdamW, "other"])
def test_a_wrong_optimizer_is_refused_before_a_backward_leaves_gradients(optimizer):
    qm = qgraph.transform(tiny_causal_lm("llama"), "lrqat-w4", rank=4)
    if optimizer == "params":
        optimizer = qm.trainable_parameters()
    elif optimizer == "other":
        optimizer = torch.optim.SGD(tiny_causal_lm("llama").parameters(), lr=1.0)
    with pytest.raises((TypeError, ValueError), match="optimizer"):
        train_causal_lm(qm, fixed_batches(1), optimizer, steps=1)
    assert all(p.grad is None for p in qm.trainable_parameters())


def test_a_module_with_nothing_to_train_names_the_plans_that_train():
    from qgraph.errors import PlanError
    from qgraph.train import default_optimizer

    qm = qgraph.transform(tiny_causal_lm("llama"), "nf4")
    with pytest.raises(PlanError, match="plan 'nf4' has nothing to train .* lrqat-w4, .*qst-nf4"):
        default_optimizer(qm)
    with pytest.raises(PlanError, match="plan 'nf4' has nothing to train"):
        train_causal_lm(qm, fixed_batches(1), torch.optim.SGD([torch.zeros(1, requires_grad=True)]), steps=1)
    with pytest.raises(TypeError, match="default_optimizer takes the module qgraph.transform returned"):
        default_optimizer(tiny_causal_lm("llama"))


def test_an_optimizer_wrapper_that_steps_is_taken():
    class Wrapper:  # not a torch.optim.Optimizer subclass, as some schedulers' and libraries' wrappers are not
        def __init__(self, optimizer):
            self.optimizer, self.param_groups = optimizer, optimizer.param_groups

        def step(self):
            self.optimizer.step()

        def zero_grad(self, set_to_none=True):
            self.optimizer.zero_grad(set_to_none=set_to_none)

    qm = qgraph.transform(tiny_causal_lm("llama"), "lrqat-w4", rank=4)
    before = [p.detach().clone() for p in qm.trainable_parameters()]
    train_causal_lm(qm, fixed_batches(1), Wrapper(torch.optim.SGD(qm.trainable_parameters(), lr=1.0)), steps=1)
    assert any(not torch.equal(a, b) for a, b in zip(before, qm.trainable_parameters()))
