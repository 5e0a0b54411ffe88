import json

import pytest
import torch

import qgraph
from qgraph.errors import QGraphError
from qgraph.models import tiny_causal_lm
from qgraph.side_io import PLAN_FILE, WEIGHTS_FILE, side_network
from tests.conftest import random_ids


def trained(model, steps=3, **options):
    qm = qgraph.transform(model, "qst-nf4", **options)
    optimizer = torch.optim.AdamW(qm.trainable_parameters(), lr=1e-2)
    ids = random_ids((2, 16), seed=0)
    for _ in range(steps):
        qm(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return qm


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_causal_lm("llama", layers=2)
    qm = trained(model, r=4, downsample="lora", adapter_rank=8)
    directory = qgraph.save_side(qm, tmp_path_factory.mktemp("side"))
    return model, qm, directory


def logits(qm, ids):
    with torch.no_grad():
        return qm(input_ids=ids).logits


def test_writes_only_the_side_network_and_the_applied_plan(saved):
    _, qm, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == sorted([PLAN_FILE, WEIGHTS_FILE])
    side_bytes = sum(p.numel() * p.element_size() for p in side_network(qm).parameters())
    assert (directory / WEIGHTS_FILE).stat().st_size < side_bytes + 16 * 1024  # weights + a small header
    meta = json.loads((directory / PLAN_FILE).read_text())
    [taps] = [p for p in meta["plan"]["passes"] if p["name"] == "attach_side_taps"]
    assert taps["options"] | {"r": 4, "downsample": "lora", "adapter_rank": 8} == taps["options"]  # overrides kept


def test_load_into_the_pretrained_model_round_trips_exactly(saved):
    model, qm, directory = saved
    loaded = qgraph.load_side(model, directory)
    assert loaded is not qm
    for (name, a), b in zip(side_network(qm).state_dict().items(), side_network(loaded).state_dict().values()):
        assert torch.equal(a, b), name
    ids = random_ids((2, 12), seed=1)
    assert torch.equal(logits(loaded, ids), logits(qm, ids))
    assert not torch.equal(logits(qgraph.transform(model, "nf4"), ids), logits(loaded, ids))  # it did train


def test_load_into_an_existing_module_overwrites_its_side_network(saved):
    model, qm, directory = saved
    fresh = qgraph.transform(model, "qst-nf4", r=4, downsample="lora", adapter_rank=8)
    assert qgraph.load_side(fresh, directory) is fresh
    ids = random_ids((2, 12), seed=2)
    assert torch.equal(logits(fresh, ids), logits(qm, ids))


def test_refuses_a_side_network_of_other_sizes(saved):
    model, _, directory = saved
    other = qgraph.transform(model, "qst-nf4", r=8)
    with pytest.raises(QGraphError, match="does not fit this model: saved SideConfig.*width=16"):
        qgraph.load_side(other, directory)


def test_errors_name_the_fix(tmp_path, saved):
    model, _, _ = saved
    with pytest.raises(QGraphError, match="holds no saved side network .* qgraph.save_side"):
        qgraph.load_side(model, tmp_path)
    with pytest.raises(QGraphError, match="has no QST side network .plan 'nf4'.*'qst-nf4'"):
        qgraph.save_side(qgraph.transform(model, "nf4"), tmp_path)
