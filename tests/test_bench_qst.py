"""tools/bench_qst.py's learning-rate split on a tiny Llama: every side-network parameter belongs to exactly one
part, and each part trains at the base rate times its factor."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import qgraph
from tests.conftest import make_llama, random_ids

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # the tools import benchlib as a sibling
import bench_qst  # noqa: E402
from benchlib import train_step  # noqa: E402


@pytest.mark.parametrize("mix", ["gate", "channel", "residual"])
def test_every_side_parameter_is_in_exactly_one_part(mix):
    qm = qgraph.transform(make_llama(), "qst-nf4", mix=mix)
    parts = {bench_qst.side_part(name) for name, p in qm.named_parameters() if p.requires_grad}
    assert parts == set(bench_qst.SIDE_PARTS)


def test_an_unknown_side_parameter_name_is_an_error_naming_the_parts():
    with pytest.raises(ValueError, match="update SIDE_PARTS"):
        bench_qst.side_part("graph_module.qst_side.something_new.weight")


@pytest.mark.parametrize("split", bench_qst.LR_SPLITS)
def test_each_part_trains_at_the_base_rate_times_its_factor(split):
    module, optimizer = bench_qst.build(f"qst-nf4-lrsplit-{split}", make_llama())
    from qgraph.side_network import SIDE_NETWORK_LR

    factors = bench_qst.LR_SPLITS[split]
    names = {id(p): name for name, p in module.named_parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            part = bench_qst.side_part(names[id(param)])
            assert group["lr"] == pytest.approx(SIDE_NETWORK_LR * factors.get(part, 1.0))
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(trained) == len(module.trainable_parameters())
    before = [p.detach().clone() for p in trained]
    assert torch.isfinite(torch.tensor(train_step(module.train(), optimizer, random_ids((2, 16)))))
    assert any(not torch.equal(b, p) for b, p in zip(before, trained))
