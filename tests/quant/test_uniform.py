
import pytest
import torch

from qgraph.quant.uniform import (
    dequantize,
    expand_scale,
    fake_quantize,
    from_groups,
    grid_bounds,
    init_scale,
    quantize_to_codes,
    resolve_group_size,
    scale_shape,
    to_grid_units,
    to_groups,
)


def lp_error_per_group(w, s, bits, group_size, p):
    diff = w - fake_quantize(w, s, bits, group_size)
    return to_groups(diff, group_size).abs().pow(p).sum(-1)


@pytest.mark.parametrize(
    ("bits", "bounds"), [(2, (-2, 1)), (3, (-4, 3)), (4, (-8, 7)), (8, (-128, 127))]
)
def test_grid_bounds(bits, bounds):
    assert grid_bounds(bits) == bounds


@pytest.mark.parametrize("bits", [1, 9, 4.0, True])
def test_grid_bounds_rejects_bad_bits(bits):
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
        grid_bounds(bits)


@pytest.mark.parametrize("group_size", [None, -1, 0])
def test_per_channel_group_size(group_size):
    assert resolve_group_size(48, group_size) == 48
    assert scale_shape(6, 48, group_size) == (6, 1)


def test_non_dividing_group_size_names_sizes_and_fix():
    with pytest.raises(ValueError) as info:
        resolve_group_size(100, 48)
    message = str(info.value)
    assert "group_size=48" in message and "in_features=100" in message
    assert "25 or 50" in message and "group_size=-1" in message
    with pytest.raises(ValueError, match="in_features=30"):
        init_scale(torch.randn(4, 30), 4, 8)


def test_groups_round_trip_and_layout():
    w = torch.arange(24.0).reshape(2, 12)
    groups = to_groups(w, 4)
    assert groups.shape == (2, 3, 4)
    assert torch.equal(groups[1, 2], torch.tensor([20.0, 21.0, 22.0, 23.0]))
    assert torch.equal(from_groups(groups), w)


def test_expand_scale_matches_grouped_dequantize():
    w_int = torch.randint(-8, 8, (5, 12)).float()
    scale = torch.rand(5, 3) + 0.1
    assert torch.equal(dequantize(w_int, scale, 4), w_int * expand_scale(scale, 12))
    assert torch.equal(to_grid_units(w_int, scale, 4), w_int / expand_scale(scale, 12))


def test_wrong_scale_shape_raises():
    with pytest.raises(ValueError, match=r"expected \(out, n_groups\) = \(5, 3\)"):
        dequantize(torch.zeros(5, 12), torch.ones(5, 2), 4)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 8])
def test_fake_quantize_is_scaled_rtn_codes(bits, group_size):
    torch.manual_seed(0)
    w = torch.randn(6, 32)
    scale = init_scale(w, bits, group_size, "minmax") * 0.7
    codes = quantize_to_codes(w, scale, bits, group_size)
    qmin, qmax = grid_bounds(bits)
    assert codes.dtype == torch.int8
    assert codes.min() >= qmin and codes.max() <= qmax
    quantized = fake_quantize(w, scale, bits, group_size)
    assert torch.equal(quantized, dequantize(codes.float(), scale, group_size))
    # Round-to-nearest: every unclipped weight is within half a step of its quantized value.
    unclipped = (codes > qmin) & (codes < qmax)
    step = expand_scale(scale, 32)
    error = (w - quantized).abs()
    assert torch.all(error[unclipped] <= 0.5 * step[unclipped] * (1 + 1e-6))


@pytest.mark.parametrize("method", ["lp", "mse", "minmax"])
@pytest.mark.parametrize(("group_size", "shape"), [(-1, (12, 1)), (None, (12, 1)), (16, (12, 4))])
def test_init_scale_shapes_finite_positive(method, group_size, shape):
    torch.manual_seed(0)
    w = torch.randn(12, 64)
    w[3] = 0.0  # an all-zero channel must still get a usable scale
    s = init_scale(w, 4, group_size, method)
    assert s.shape == shape and s.dtype == torch.float32
    assert torch.all(torch.isfinite(s)) and torch.all(s > 0)


def test_minmax_scale_maps_absmax_to_qmax():
    w = torch.tensor([[0.5, -2.0, 1.0, 0.0], [3.5, 1.0, -1.0, 0.25]])
    assert torch.allclose(init_scale(w, 4, -1, "minmax"), torch.tensor([[2.0 / 7], [3.5 / 7]]))


@pytest.mark.parametrize(("method", "p"), [("lp", 4.0), ("mse", 2.0)])
@pytest.mark.parametrize("group_size", [-1, 16])
@pytest.mark.parametrize("bits", [3, 4])
def test_search_beats_minmax_in_its_norm(method, p, group_size, bits):
    torch.manual_seed(0)
    # Heavy tails make clipping worthwhile: the search must find it, per channel / group.
    w = torch.distributions.StudentT(3.0).sample((16, 64))
    searched = init_scale(w, bits, group_size, method)
    minmax = init_scale(w, bits, group_size, "minmax")
    err_searched = lp_error_per_group(w, searched, bits, group_size, p)
    err_minmax = lp_error_per_group(w, minmax, bits, group_size, p)
    assert torch.all(err_searched <= err_minmax * (1 + 1e-6))
    assert err_searched.sum() < 0.9 * err_minmax.sum()
    assert torch.all(searched <= minmax * (1 + 1e-6))


def test_init_scale_keeps_float64_and_promotes_bf16():
    w = torch.randn(4, 16, dtype=torch.float64)
    assert init_scale(w, 4, -1).dtype == torch.float64
    assert init_scale(w.to(torch.bfloat16), 4, -1).dtype == torch.float32


def test_unknown_init_method_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown scale init method 'lp4'.*lp"):
        init_scale(torch.randn(4, 16), 4, -1, method="lp4")
