"""tools/bench_qst.py on a tiny Llama: the learning-rate split (every side-network parameter belongs to exactly one
part, and each part trains at the base rate times its factor) and the study adjustments of the built module."""

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


# --- the study adjustments (STUDY_ADJUSTMENTS): changes to the built default module ---------------------------


def llama_with_a_final_norm() -> torch.nn.Module:
    """A tiny Llama whose final norm weight is not all ones, so that a rule reading it is seen to read it."""
    model = make_llama()
    with torch.no_grad():
        model.base_model.norm.weight.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(3))
    return model


@pytest.mark.parametrize("config", bench_qst.STUDY_ADJUSTMENTS)
def test_each_adjustment_starts_as_the_nf4_backbone_and_leaves_it_frozen(config):
    model = llama_with_a_final_norm()
    ids = random_ids((2, 16))
    with torch.no_grad():
        nf4_logits = qgraph.transform(model, "nf4")(input_ids=ids).logits
    module, optimizer = bench_qst.build(config, model)
    with torch.no_grad():  # a = 1 at step 0: the head reads the backbone's own final state
        torch.testing.assert_close(module(input_ids=ids).logits, nf4_logits, rtol=0, atol=0)
    frozen = {name: t.clone() for name, t in module.graph_module.named_buffers()}
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    before = [p.detach().clone() for p in trained]
    for step in range(3):
        assert torch.isfinite(torch.tensor(train_step(module.train(), optimizer, random_ids((2, 16), seed=step))))
    assert all(torch.equal(t, frozen[name]) for name, t in module.graph_module.named_buffers())  # backbone untouched
    assert any(not torch.equal(b, p) for b, p in zip(before, trained))  # the side network or the head's delta


def test_zero_upsample_and_the_final_norm_scale():
    model = llama_with_a_final_norm()
    final_norm = model.base_model.norm.weight.detach().clone()
    default, _ = bench_qst.build("qst-nf4", llama_with_a_final_norm())
    zero, _ = bench_qst.build("qst-nf4-upzero", llama_with_a_final_norm())
    scaled, _ = bench_qst.build("qst-nf4-upnorm", model)
    up = {name: bench_qst.side_network(m).upsample for name, m in (("default", default), ("zero", zero),
                                                                     ("scaled", scaled))}
    assert not up["zero"].weight.any() and not up["zero"].bias.any()
    # the same seeded draw, each row times its feature's norm weight
    torch.testing.assert_close(up["scaled"].weight, up["default"].weight * final_norm[:, None])
    assert not up["scaled"].bias.any()


def test_normalised_taps_rms_normalise_before_the_default_downsample():
    default, _ = bench_qst.build("qst-nf4", llama_with_a_final_norm())
    tapnorm, _ = bench_qst.build("qst-nf4-tapnorm", llama_with_a_final_norm())
    tap = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0)) * 30.0
    normalised = tap * torch.rsqrt(tap.pow(2).mean(-1, keepdim=True) + bench_qst.NORM_EPS)
    for plain, adjusted in zip(bench_qst.side_network(default).downsamples, bench_qst.side_network(tapnorm).downsamples):
        torch.testing.assert_close(adjusted(tap), plain(normalised))


def test_a_mix_schedule_sets_a_after_every_step_and_keeps_it_out_of_the_optimizer():
    module, optimizer = bench_qst.build("qst-nf4-mix0.5", make_llama())
    mix = bench_qst.side_network(module).mix
    assert not mix.requires_grad
    assert all(p is not mix for group in optimizer.param_groups for p in group["params"])
    for step in range(1, 4):
        train_step(module.train(), optimizer, random_ids((2, 16), seed=step))
        assert mix.item() == pytest.approx(1 - 0.5 * step / 25)
    schedule = bench_qst.mix_schedule(2, 0.2)
    module, optimizer = bench_qst.build("qst-nf4", make_llama())
    schedule(module, optimizer)
    for step in range(4):  # past the ramp: held at its end
        train_step(module.train(), optimizer, random_ids((2, 16), seed=step))
    assert bench_qst.side_network(module).mix.item() == pytest.approx(0.2)
