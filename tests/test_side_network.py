import pytest
import torch

from qgraph.side_network import (
    DOWNSAMPLE_KINDS, MIX_KINDS, SideConfig, SideNetwork, attention_allowed, positions_from_mask,
    rotary_tables, rotate,
)

D, R = 64, 4


def config(downsample="adapter", blocks=2, heads=2, mix="gate"):
    return SideConfig(backbone_width=D, width=D // R, ffn_width=64 // R, heads=heads, blocks=blocks,
                      downsample=downsample, adapter_rank=8, mix=mix)


def taps(blocks=2, shape=(2, 10), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, D, generator=g) for _ in range(blocks + 1)]


@pytest.mark.parametrize("mix", MIX_KINDS)
def test_output_is_the_head_input_exactly_at_the_start(mix):
    torch.manual_seed(0)
    side = SideNetwork(config(mix=mix))
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


def test_residual_mix_adds_the_side_output_and_starts_at_the_head_input():
    torch.manual_seed(0)
    side = SideNetwork(config(mix="residual"))
    head, mask = torch.randn(2, 10, D), torch.ones(2, 10, dtype=torch.long)
    assert not hasattr(side, "mix")
    assert torch.equal(side(head, mask, *taps()), head)
    side(head, mask, *taps()).square().sum().backward()
    # step 0: the upsample (from zero) has a gradient, what lies behind it has none yet
    assert side.upsample.weight.grad.abs().sum() > 0
    assert side.blocks[0].attn.qkv.weight.grad.abs().sum() == 0
    with torch.no_grad():
        torch.nn.init.normal_(side.upsample.weight)
        expected = head + side.side_output(mask, *taps())
        torch.testing.assert_close(side(head, mask, *taps()), expected)
    side.zero_grad()
    side(head, mask, *taps()).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in side.parameters())


@pytest.mark.parametrize("mix", ["channel", "modulate"])
def test_channel_gates_and_modulation_act_per_feature(mix):
    torch.manual_seed(0)
    side = SideNetwork(config(mix=mix))
    head, mask = torch.randn(2, 10, D), torch.ones(2, 10, dtype=torch.long)
    with torch.no_grad():
        side.mix.uniform_(0.2, 0.8)
        if mix == "modulate":
            torch.nn.init.normal_(side.modulation.weight)
        up, modulation, _ = side._side_outputs(mask, tuple(taps()))
        expected = side.mix * head + (1 - side.mix) * up + (head * modulation if mix == "modulate" else 0)
        torch.testing.assert_close(side(head, mask, *taps()), expected)
    assert side.mix.shape == ((D,) if mix == "channel" else ())
    side(head, mask, *taps()).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in side.parameters())


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


@pytest.mark.parametrize("splits", [(4, 1, 1, 1), (1, 1, 1, 1, 1, 1, 1), (6, 1)])
def test_decoding_with_past_keys_and_values_gives_the_new_rows_of_the_whole_sequence(splits):
    """Fed its own present back as past (after a hidden zero slot, as qgraph.decode starts a prompt), the side
    network computes each chunk's rows of the whole sequence's output."""
    torch.manual_seed(0)
    side = SideNetwork(config())
    whole, head = taps(shape=(2, 7), seed=2), torch.randn(2, 7, D)
    with torch.no_grad():
        side.mix.fill_(0.5)  # the output then depends on the side network's
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0  # left padding in the prompt
    head_dim = config().head_dim
    with torch.no_grad():
        expected = side(head, mask, *whole)
        past = [torch.zeros(2, 2, 1, head_dim) for _ in range(2 * config().blocks)]
        past_mask, rows, start = torch.zeros(2, 1, dtype=torch.long), [], 0
        for size in splits:
            chunk = slice(start, start + size)
            row, *past = side(head[:, chunk], mask[:, chunk], *(t[:, chunk] for t in whole),
                              past_attention_mask=past_mask, past=past)
            rows.append(row)
            past_mask, start = torch.cat([past_mask, mask[:, chunk]], 1), start + size
    torch.testing.assert_close(torch.cat(rows, dim=1), expected, rtol=1e-5, atol=1e-5)
    assert len(past) == 2 * config().blocks and past[0].shape == (2, 2, 1 + 7, head_dim)


def test_mask_and_positions():
    mask = torch.tensor([[0, 1, 1, 0]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 1, 1]]
    allowed = attention_allowed(mask)[0, 0].int().tolist()
    assert allowed == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1]]
    assert attention_allowed(mask, 2)[0, 0].int().tolist() == allowed[2:]  # a decode step's rows only


def test_past_keys_and_values_need_the_masks():
    side, head = SideNetwork(config()), torch.randn(2, 1, D)
    past = [torch.zeros(2, 2, 1, config().head_dim) for _ in range(2 * config().blocks)]
    with pytest.raises(ValueError, match="need past_attention_mask and attention_mask"):
        side(head, torch.ones(2, 1, dtype=torch.long), *taps(shape=(2, 1)), past=past)


def test_rotation_keeps_norms_and_makes_scores_relative():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)
    at = lambda x, p: rotate(x, rotary_tables(torch.tensor([[p]]), 8, x.dtype))  # noqa: E731
    torch.testing.assert_close(at(q, 5).norm(), q.norm())
    torch.testing.assert_close((at(q, 7) * at(k, 3)).sum(), (at(q, 14) * at(k, 10)).sum(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mix": "sum"}, "mix must be one of gate, channel, residual, modulate, got 'sum'"),
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


# --- the pruned init's rule (qgraph/side_init.py) ------------------------------------------------------------


def test_top_indices_keeps_the_largest_in_ascending_order_and_the_lower_index_on_ties():
    from qgraph.side_init import top_indices

    assert top_indices(torch.tensor([0.1, 5.0, 3.0, 5.0, 4.0]), 3).tolist() == [1, 3, 4]
    assert top_indices(torch.tensor([2.0, 2.0, 2.0]), 2).tolist() == [0, 1]


def _block(heads=2, kv_heads=1, head_dim=4, d=8, ffn=6, seed=0):
    from qgraph.side_init import BackboneBlock

    g = torch.Generator().manual_seed(seed)
    w = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return BackboneBlock(q=w(heads * head_dim, d), k=w(kv_heads * head_dim, d), v=w(kv_heads * head_dim, d),
                         o=w(d, heads * head_dim), gate=w(ffn, d), up=w(ffn, d), down=w(d, ffn),
                         attn_norm=None, mlp_norm=None, heads=heads, kv_heads=kv_heads)


def test_kept_head_dimensions_are_whole_rotary_pairs_in_rotate_half_layout():
    from qgraph.side_init import choose_block

    block = _block(heads=2, head_dim=8)
    with torch.no_grad():
        block.q[1 * 8 + 6] *= 100  # head 1's pair (2, 6) dominates: head 1 and that pair are kept
    choice = choose_block(block, side_heads=1, side_head_dim=2, side_ffn=3)
    assert choice.heads.tolist() == [1]
    assert choice.qk_dims.tolist() == [[2, 6]]  # the side network rotates dim i with dim i + head_dim/2


def test_pruned_state_takes_each_query_heads_own_key_value_head():
    from qgraph.side_init import BlockChoice, pruned_block_state

    block = _block(heads=4, kv_heads=2, head_dim=2, d=8)
    choice = BlockChoice(heads=torch.tensor([1, 2]), qk_dims=torch.tensor([[0, 1], [0, 1]]),
                         v_dims=torch.tensor([[1, 0], [0, 1]]), ffn=torch.tensor([0, 5]))
    hidden = torch.tensor([0, 3, 4, 7])
    state = pruned_block_state(block, choice, hidden)
    q, k, v = state["attn.qkv.weight"].chunk(3)
    torch.testing.assert_close(q, block.q[[2, 3, 4, 5]][:, hidden])  # query heads 1 and 2
    torch.testing.assert_close(k, block.k[[0, 1, 2, 3]][:, hidden])  # their key heads: 1 // 2 = 0, 2 // 2 = 1
    torch.testing.assert_close(v, block.v[[1, 0, 2, 3]][:, hidden])
    torch.testing.assert_close(state["attn.out.weight"], block.o[hidden][:, [3, 2, 4, 5]])
    gate_up = torch.cat([block.gate[[0, 5]], block.up[[0, 5]]])[:, hidden]
    torch.testing.assert_close(state["mlp.gate_up.weight"], gate_up)
    torch.testing.assert_close(state["mlp.down.weight"], block.down[hidden][:, [0, 5]])
    assert torch.equal(state["attn_norm.weight"], torch.ones(4))  # no norm weight to copy: the identity


def test_a_pruned_side_block_loads_into_the_side_network():
    from qgraph.side_init import choose_block, hidden_scores, pruned_block_state, top_indices

    block = _block(heads=2, kv_heads=1, head_dim=8, d=16, ffn=12)
    side = SideNetwork(SideConfig(backbone_width=16, width=8, ffn_width=6, heads=2, blocks=1))
    hidden = top_indices(hidden_scores([block]), 8)
    side.blocks[0].load_state_dict(pruned_block_state(block, choose_block(block, 2, 4, 6), hidden))  # strict
