"""Shared fixtures: tiny seeded Hugging Face models and captures of them.

Models are rebuilt per test (cheap); captures and transforms, which take about a second each, are
module-scoped so one test file shares them but no state leaks between files. Tests that mutate a
graph or a model build their own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import qgraph
from qgraph.models import tiny_causal_lm

# Under pytest-xdist (`-n 2`, the README's test command) each worker process runs tests of its own: one torch
# thread each keeps two workers on two cores instead of four threads contending for them
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

LAYERS = 2
HIDDEN = 64
VOCAB = 256


def make_llama(layers: int = LAYERS, seed: int = 0) -> nn.Module:
    return tiny_causal_lm("llama", layers=layers, hidden=HIDDEN, vocab=VOCAB, seed=seed)


def make_gpt2(layers: int = LAYERS, seed: int = 0) -> nn.Module:
    return tiny_causal_lm("gpt2", layers=layers, hidden=HIDDEN, vocab=VOCAB, seed=seed)


def random_ids(shape: tuple[int, ...], seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    """Token ids that avoid the special ids 0-2 (pad, bos, eos)."""
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


def train_steps(qm: nn.Module, input_ids: torch.Tensor, steps: int, lr: float) -> nn.Module:
    """`steps` AdamW steps of `qm`'s trainable parameters on one batch (language modelling), in place."""
    optimizer = torch.optim.AdamW(qm.trainable_parameters(), lr=lr)
    for _ in range(steps):
        qm(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return qm


@dataclass
class ModelSnapshot:
    """Everything about a model a failed call must leave alone."""

    state: dict[str, torch.Tensor]
    param_ids: dict[str, int]
    requires_grad: dict[str, bool]
    module_types: dict[str, type]
    training: dict[str, bool]

    @classmethod
    def of(cls, model: nn.Module) -> ModelSnapshot:
        return cls(
            state={k: v.detach().clone() for k, v in model.state_dict().items()},
            param_ids={k: id(p) for k, p in model.named_parameters()},
            requires_grad={k: p.requires_grad for k, p in model.named_parameters()},
            module_types={k: type(m) for k, m in model.named_modules()},
            training={k: m.training for k, m in model.named_modules()},
        )

    def assert_unchanged(self, model: nn.Module) -> None:
        now = ModelSnapshot.of(model)
        assert now.module_types == self.module_types
        assert now.param_ids == self.param_ids
        assert now.requires_grad == self.requires_grad
        assert now.training == self.training
        assert now.state.keys() == self.state.keys()
        for key, value in self.state.items():  # NaN equals NaN here: a model may hold one on purpose
            torch.testing.assert_close(now.state[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
        for module in model.modules():
            assert not module._forward_hooks and not module._forward_pre_hooks


@pytest.fixture
def make_ids():
    """`make_ids(shape, seed=0)`: token ids in 3..255, reproducible."""
    return random_ids


@pytest.fixture
def snapshot():
    """`snapshot(model)` records a model; `.assert_unchanged(model)` checks nothing about it moved."""
    return ModelSnapshot.of


@pytest.fixture
def tiny_llama() -> nn.Module:
    """A fresh 2-layer Llama (hidden 64, vocab 256, 512 positions), seed 0, eval mode."""
    return make_llama()


@pytest.fixture
def tiny_gpt2() -> nn.Module:
    """A fresh 2-layer GPT-2 (Conv1D linears, LM head tied to wte), seed 0, eval mode."""
    return make_gpt2()


@pytest.fixture(scope="module")
def llama_capture() -> tuple[nn.Module, torch.fx.GraphModule]:
    """(model, qgraph.capture(model)) for one test module; tests must not mutate either."""
    model = make_llama()
    return model, qgraph.capture(model)


@pytest.fixture(scope="module")
def gpt2_capture() -> tuple[nn.Module, torch.fx.GraphModule]:
    model = make_gpt2()
    return model, qgraph.capture(model)


@pytest.fixture(scope="module")
def llama_nf4() -> tuple[nn.Module, qgraph.QGraphModule]:
    """(model, qgraph.transform(model, "nf4")) for one test module; tests must not mutate either."""
    model = make_llama()
    return model, qgraph.transform(model, "nf4")
