import pytest
import torch

from qgraph.quant.downcast import (
    PHI_FORMATS,
    bytes_per_weight,
    downcast,
    pack_codes,
    pack_int4,
    unpack_codes,
    unpack_int4,
    upcast,
)
from qgraph.quant.uniform import grid_bounds

ALL_BITS = [2, 3, 4, 5, 6, 7, 8]


def grid_values(bits, shape=(6, 10), seed=0):
    """Values in grid units, some beyond the grid ends (they must come back clamped)."""
    qmin, qmax = grid_bounds(bits)
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator) * (qmax - qmin + 4) + qmin - 2


def test_formats_listed():
    assert PHI_FORMATS == ("fixed", "int-packed", "bf16", "fp32")


def test_unknown_format_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown phi format 'int4'.*int-packed"):
        downcast(torch.zeros(2, 2), "int4", 4)
    with pytest.raises(ValueError, match="fixed"):
        upcast(torch.zeros(2, 2), "q4.4", 4, 2)


@pytest.mark.parametrize(
    ("fmt", "bits", "expected"),
    [("fixed", 4, 1.0), ("int-packed", 4, 0.5), ("int-packed", 2, 0.5), ("int-packed", 5, 1.0),
     ("bf16", 4, 2.0), ("fp32", 3, 4.0)],
)
def test_bytes_per_weight(fmt, bits, expected):
    assert bytes_per_weight(fmt, bits) == expected


@pytest.mark.parametrize("bits", ALL_BITS)
def test_fixed_point_round_trip_within_half_a_fixed_step(bits):
    x = grid_values(bits)
    qmin, qmax = grid_bounds(bits)
    phi = downcast(x, "fixed", bits)
    assert phi.dtype == torch.int8 and phi.shape == x.shape
    back = upcast(phi, "fixed", bits, x.shape[1])
    fractional_step = 2.0 ** -(8 - bits)
    assert torch.all((back - x.clamp(qmin, qmax)).abs() <= fractional_step / 2)


def test_fixed_point_q4_4_layout():
    # Q4.4: the stored byte is 16 x the value.
    phi = downcast(torch.tensor([[2.5, -8.0, 7.0, 0.0625, 100.0]]), "fixed", 4)
    assert phi.tolist() == [[40, -128, 112, 1, 112]]


@pytest.mark.parametrize("bits", ALL_BITS)
def test_fixed_point_values_survive_exactly(bits):
    qmin, qmax = grid_bounds(bits)
    steps = 2 ** (8 - bits)
    x = torch.arange(qmin * steps, qmax * steps + 1, dtype=torch.float64).reshape(1, -1) / steps
    assert torch.equal(upcast(downcast(x, "fixed", bits), "fixed", bits, x.shape[1], torch.float64), x)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("in_features", [10, 11])
def test_int_packed_round_trip_is_rtn(bits, in_features):
    x = grid_values(bits, (6, in_features))
    qmin, qmax = grid_bounds(bits)
    phi = downcast(x, "int-packed", bits)
    if bits <= 4:
        assert phi.dtype == torch.uint8 and phi.shape == (6, (in_features + 1) // 2)
    else:
        assert phi.dtype == torch.int8 and phi.shape == (6, in_features)
    back = upcast(phi, "int-packed", bits, in_features, torch.float64)
    assert back.dtype == torch.float64
    assert torch.equal(back, x.round().clamp(qmin, qmax).double())


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_bf16_round_trip_clamps_and_keeps_bf16_precision(bits):
    x = grid_values(bits)
    qmin, qmax = grid_bounds(bits)
    phi = downcast(x, "bf16", bits)
    assert phi.dtype == torch.bfloat16
    back = upcast(phi, "bf16", bits, x.shape[1])
    assert back.min() >= qmin and back.max() <= qmax
    torch.testing.assert_close(back, x.clamp(qmin, qmax), rtol=2**-8, atol=0)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_fp32_round_trip_is_exact_after_clamp(bits):
    x = grid_values(bits)
    qmin, qmax = grid_bounds(bits)
    phi = downcast(x, "fp32", bits)
    assert phi.dtype == torch.float32
    assert torch.equal(upcast(phi, "fp32", bits, x.shape[1]), x.clamp(qmin, qmax))
    assert upcast(phi, "fp32", bits, x.shape[1], torch.float64).dtype == torch.float64


def test_pack_int4_convention():
    # Column 2j in the low nibble, 2j+1 in the high nibble, two's complement; odd tail padded with 0.
    codes = torch.tensor([[-1, 2, -8, 7, 3]], dtype=torch.int8)
    assert pack_int4(codes).tolist() == [[0x2F, 0x78, 0x03]]


@pytest.mark.parametrize("table", [True, False], ids=["table", "shifts"])
@pytest.mark.parametrize("n", [16, 15, 1])
def test_pack_unpack_int4_round_trip(n, table):
    codes = torch.randint(-8, 8, (3, 2, n), dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 2, (n + 1) // 2)
    assert torch.equal(unpack_int4(packed, n, table=table), codes)


@pytest.mark.parametrize("table", [True, False], ids=["table", "shifts"])
def test_every_byte_unpacks_to_its_two_codes(table):
    # all 256 bytes: every pair of signed nibbles, in both nibble orders
    codes = torch.stack(torch.meshgrid(torch.arange(-8, 8), torch.arange(-8, 8), indexing="ij"), -1).reshape(1, 512)
    codes = codes.to(torch.int8)
    assert torch.equal(unpack_int4(pack_int4(codes), 512, table=table), codes)


def test_pack_int4_rejects_out_of_range_and_wrong_dtype():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([[8, 0]], dtype=torch.int8))
    with pytest.raises(ValueError, match="int8"):
        pack_int4(torch.tensor([[1, 0]]))


def test_unpack_int4_checks_row_length():
    with pytest.raises(ValueError, match="in_features=10"):
        unpack_int4(torch.zeros(2, 4, dtype=torch.uint8), 10)


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_pack_codes_round_trip(bits):
    qmin, qmax = grid_bounds(bits)
    codes = torch.randint(qmin, qmax + 1, (4, 9), dtype=torch.int8)
    stored = pack_codes(codes, bits)
    assert stored.dtype == (torch.uint8 if bits <= 4 else torch.int8)
    assert torch.equal(unpack_codes(stored, bits, 9), codes)
