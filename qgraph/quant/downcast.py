"""Storage formats phi for LR-QAT's frozen Phi0 = phi(W0 / s0), and the b-bit code packing they share.

Formats (values in grid units, i.e. W0 / s0):
  "fixed"       fixed point Q(b).(8-b) in int8 (the paper's default): b integer bits, 8-b fractional.
  "int-packed"  the RTN integer codes; two per byte for b <= 4 (see `pack_int4`), int8 for b > 4.
  "bf16"        bfloat16.
  "fp32"        float32.
Every format stores the value clamped to [qmin, qmax]: the forward cannot use anything beyond the grid
ends anyway, and so the formats differ only in precision (the paper's fixed point clamps too).

Step 0 (A = 0) and RTN: "int-packed" stores the RTN codes themselves and "fp32" the value itself (for a
float32 W0 / s0), so both start exactly at RTN. "fixed" with b < 8 rounds W0 / s0 to 2^-(8-b) first: a
value within 2^-(9-b) of a half-integer k + 1/2 becomes exactly k + 1/2 and the grid round then takes
the even neighbour, which is not always the one RTN of the unrounded value takes (Q4.4: 2.52 -> 2.5 ->
2, RTN gives 3). "bf16" has the same double-rounding cases. "fixed" at b = 8 (Q8.0) is exact RTN.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor

from qgraph.errors import unknown_name_message
from qgraph.quant.uniform import grid_bounds

PHI_FORMATS = ("fixed", "int-packed", "bf16", "fp32")
FIXED_POINT_BITS = 8
PACKED_MAX_BITS = 4


def check_phi_format(fmt: str) -> None:
    if fmt not in PHI_FORMATS:
        raise ValueError(unknown_name_message("phi format", fmt, PHI_FORMATS))


def fractional_bits(bits: int) -> int:
    """Fractional bits of the Q(b).(8-b) fixed-point format (0 at b = 8: plain integers)."""
    grid_bounds(bits)
    return FIXED_POINT_BITS - bits


def bytes_per_weight(fmt: str, bits: int) -> float:
    """Storage per weight of Phi0 (a packed row of odd length carries half a byte of padding)."""
    check_phi_format(fmt)
    grid_bounds(bits)
    if fmt == "int-packed":
        return 0.5 if bits <= PACKED_MAX_BITS else 1.0
    return {"fixed": 1.0, "bf16": 2.0, "fp32": 4.0}[fmt]


def downcast(x: Tensor, fmt: str, bits: int) -> Tensor:
    """phi(x) for x = W0 / s0 of shape (out, in)."""
    check_phi_format(fmt)
    qmin, qmax = grid_bounds(bits)
    clamped = x.clamp(qmin, qmax)
    if fmt == "fixed":
        # 2^f * qmax = 128 - 2^f and 2^f * qmin = -128: always inside int8.
        return (clamped * 2 ** fractional_bits(bits)).round().to(torch.int8)
    if fmt == "int-packed":
        return pack_codes(clamped.round().to(torch.int8), bits)
    if fmt == "bf16":
        return clamped.to(torch.bfloat16)
    return clamped.to(torch.float32)


def upcast(
    phi: Tensor, fmt: str, bits: int, in_features: int, dtype: torch.dtype = torch.float32, *, table: bool = True
) -> Tensor:
    """phi^-1: the stored Phi0 back to grid units, shape (out, in), in `dtype` (`table`: see `unpack_int4`).

    May return `phi` itself when it already has `dtype`: callers must not modify the result in place.
    """
    values, factor = upcast_unscaled(phi, fmt, bits, in_features, dtype, table=table)
    # Multiplying by a power of two is exact: the fixed-point value comes back unchanged.
    return values if factor == 1 else values * factor


def upcast_unscaled(
    phi: Tensor, fmt: str, bits: int, in_features: int, dtype: torch.dtype = torch.float32, *, table: bool = True
) -> tuple[Tensor, float]:
    """phi^-1 as (values, factor) with phi^-1(phi) = factor * values, factor a power of two.

    The fixed-point format's 2^-(8-b) is left to the caller, who can fold it into the next operation
    (an addmm's beta) instead of spending a pass over the weight on it. `values` may be `phi` itself.
    """
    check_phi_format(fmt)
    if fmt == "fixed":
        return phi.to(dtype), 2.0 ** -fractional_bits(bits)
    if fmt == "int-packed":
        return unpack_codes(phi, bits, in_features, table=table).to(dtype), 1.0
    return phi.to(dtype), 1.0


def pack_int4(codes: Tensor) -> Tensor:
    """Pack signed 4-bit codes (int8 in [-8, 7], shape (..., n)) two per byte: uint8 (..., ceil(n / 2)).

    Convention: column 2j goes to the low nibble and column 2j+1 to the high nibble of byte j, each as a
    4-bit two's complement number; an odd last column is padded with a zero code in the high nibble.
    """
    if codes.dtype != torch.int8:
        raise ValueError(f"pack_int4 expects int8 codes, got {codes.dtype}")
    if codes.numel() and (codes.min() < -8 or codes.max() > 7):
        raise ValueError("pack_int4 codes must lie in [-8, 7] (signed 4-bit)")
    if codes.shape[-1] % 2:
        codes = F.pad(codes, (0, 1))
    nibbles = codes.to(torch.int16) & 0xF
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: Tensor, in_features: int, *, table: bool = True) -> Tensor:
    """Inverse of `pack_int4`: uint8 (..., ceil(n / 2)) to int8 codes (..., n), n = in_features.

    `table` looks each byte's two codes up in a 256-entry table (one gather: on CPU ~10x faster than the
    shifts); `table=False` shifts and masks, elementwise ops a compiler fuses into what reads the codes.
    """
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 expects uint8, got {packed.dtype}")
    if packed.shape[-1] != (in_features + 1) // 2:
        raise ValueError(
            f"packed codes have {packed.shape[-1]} bytes per row, expected {(in_features + 1) // 2} "
            f"for in_features={in_features}"
        )
    if table and sys.byteorder == "little":  # the table's int16 holds the low nibble's code in its first byte
        pairs = _code_pair_table(packed.device).index_select(0, packed.reshape(-1).to(torch.int32))
        return pairs.view(torch.int8).reshape(*packed.shape[:-1], -1)[..., :in_features]
    # low nibble first: shifting each byte by (0, 4) is elementwise
    shifts = 4 * torch.arange(2, dtype=torch.int16, device=packed.device)
    nibbles = ((packed.to(torch.int16).unsqueeze(-1) >> shifts) & 0xF).flatten(-2)[..., :in_features]
    # (n ^ 8) - 8 sign-extends a 4-bit two's complement nibble.
    return ((nibbles ^ 8) - 8).to(torch.int8)


def _code_pair_table(device: torch.device) -> Tensor:
    """int16 (256,): for each byte, its two signed 4-bit codes as the int16's two bytes, low nibble first.

    Built on every call (256 entries: microseconds) rather than cached, so that tracing sees ops, not a
    constant from outside the trace."""
    byte = torch.arange(256, dtype=torch.int32, device=device)
    low, high = ((byte & 0xF) ^ 8) - 8, ((byte >> 4) ^ 8) - 8
    # the two int8 codes as the little-endian bytes of one int16 (wrapped into int16's range)
    return (((low & 0xFF) | ((high & 0xFF) << 8)) - ((high < 0).to(torch.int32) << 16)).to(torch.int16)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """The stored form of b-bit int8 codes: packed two per byte for b <= 4, int8 as is above."""
    grid_bounds(bits)
    return pack_int4(codes) if bits <= PACKED_MAX_BITS else codes


def unpack_codes(stored: Tensor, bits: int, in_features: int, *, table: bool = True) -> Tensor:
    """Inverse of `pack_codes`: int8 codes (..., in_features) (`table`: see `unpack_int4`)."""
    grid_bounds(bits)
    if bits <= PACKED_MAX_BITS:
        return unpack_int4(stored, in_features, table=table)
    if stored.dtype != torch.int8:
        raise ValueError(f"{bits}-bit codes are stored as int8, got {stored.dtype}")
    return stored
