import pytest
import torch

from qgraph.side_network import (
    DOWNSAMPLE_KINDS, SideConfig, SideNetwork, attention_allowed, positions_from_mask, rotary_tables, rotate,
)

D, R = 64, 4


def config(downsample="adapter", blocks=2, heads=2):
    return SideConfig(backbone_width=D, width=D // R, ffn_width=64 // R, heads=heads, blocks=blocks,
                      downsample=downsample, adapter_rank=8)


def taps(blocks=2, shape=(2, 10), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, D, generator=g) for _ in range(blocks + 1)]


def test_output_is_the_head_input_exactly_while_a_is_one():
    torch.manual_seed(0)
    side = SideNetwork(config())
    head = torch.randn(2, 10, D)
    assert torch.equal(side(head, None, *taps()), head)


@pytest.mark.parametrize("kind", DOWNSAMPLE_KINDS)
def test_every_downsample_trains_once_a_leaves_one(kind):
    torch.manual_seed(0)
    side = SideNetwork(config(kind))
    with torch.no_grad():
        side.mix.fill_(0.5)
    out = side(torch.randn(2, 10, D), torch.ones(2, 10, dtype=torch.long), *taps())
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in side.parameters()), kind
    pool = kind.endswith("pool")
    assert (sum(p.numel() for p in side.downsamples.parameters()) == 0) == pool


def test_pooling_takes_max_or_mean_of_r_adjacent_features():
    x = torch.arange(2 * D, dtype=torch.float32).reshape(1, 2, D)
    maxpool = SideNetwork(config("maxpool")).downsamples[0]
    avgpool = SideNetwork(config("avgpool")).downsamples[0]
    assert torch.equal(maxpool(x), x.reshape(1, 2, D // R, R).amax(-1))
    assert torch.equal(avgpool(x)[0, 0, :2], torch.tensor([1.5, 5.5]))


def test_gates_mix_downsampled_tap_and_block_output_as_sigmoid_gamma():
    torch.manual_seed(0)
    side = SideNetwork(config(blocks=1))
    tap0, tap1 = taps(blocks=1)
    mask = torch.ones(2, 10, dtype=torch.long)
    with torch.no_grad():
        side.gates.fill_(-50.0)  # b = 0: only the tap of layer 1 reaches the output
        only_tap = side.side_output(mask, tap0, tap1)
        expected = side.upsample(side.norm(side.downsamples[1](tap1)))
    torch.testing.assert_close(only_tap, expected)


def test_left_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    side = SideNetwork(config())
    real = taps(shape=(1, 6), seed=1)
    padded = [torch.cat([torch.randn(1, 3, D), t], dim=1) for t in real]  # 3 pad positions first
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = side.side_output(None, *real)
        with_pad = side.side_output(mask, *padded)
    torch.testing.assert_close(with_pad[:, 3:], alone, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(with_pad).all()  # pad queries see themselves: no all-masked softmax row


def test_mask_and_positions():
    mask = torch.tensor([[0, 1, 1, 0]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 1, 1]]
    allowed = attention_allowed(mask)[0, 0].int().tolist()
    assert allowed == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1]]


def test_rotation_keeps_norms_and_makes_scores_relative():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)
    at = lambda x, p: rotate(x, rotary_tables(torch.tensor([[p]]), 8, x.dtype))  # noqa: E731
    torch.testing.assert_close(at(q, 5).norm(), q.norm())
    torch.testing.assert_close((at(q, 7) * at(k, 3)).sum(), (at(q, 14) * at(k, 10)).sum(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"downsample": "conv"}, "downsample must be one of"),
    ({"width": 5}, "side width 5 must divide the backbone width 64"),
    ({"heads": 16}, "16 heads need a side width .16. that splits into heads of even size"),
])
def test_bad_config(kwargs, message):
    base = dict(backbone_width=D, width=16, ffn_width=16, heads=2, blocks=1)
    with pytest.raises(ValueError, match=message):
        SideConfig(**(base | kwargs))


def test_wrong_number_of_taps():
    with pytest.raises(ValueError, match="reads 3 taps, got 2"):
        SideNetwork(config()).side_output(None, *taps()[:2])


def test_side_network_of_a_module_without_one_names_the_plan_that_has_one(llama_nf4):
    from qgraph.errors import QGraphError
    from qgraph.side_network import side_network

    _, qm = llama_nf4
    with pytest.raises(QGraphError, match="has no QST side network .plan 'nf4'.*'qst-nf4'"):
        side_network(qm)
