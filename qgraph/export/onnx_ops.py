"""ONNX Runtime's 4-bit contrib ops for the onnx target: their schemas, qgraph's weights in their layouts, and
the translations torch.onnx maps onto them.

Two ORT ops (domain com.microsoft) carry qgraph's packed weights:

* `MatMulNBits` for `qgraph::int4_linear`: B is uint8 [N, n_blocks, blob] with blocks of `block_size` along
  K, codes unsigned with an implicit zero point of 2^(bits-1) (8 for 4 bits), two 4-bit codes per byte with
  the FIRST element in the LOW nibble; scales fp32 [N, n_blocks]; an optional bias [N].
* `MatMulBnb4` for `qgraph::nf4_linear`: B is the bitsandbytes NF4 bytes as they are (flattened [N*K] weight,
  FIRST element in the HIGH nibble), absmax plain fp32, one per block of the flattened weight.

torch.onnx maps a torch op to ONNX through a translation function that sees the op's inputs as graph
values, so it cannot repack a weight. The writer (qgraph.export.onnx) therefore first rewrites a copy of
the finalized graph so that each qgraph op becomes one of the two helper ops below, `qgraph_onnx::matmul_nbits`
and `qgraph_onnx::matmul_bnb4`, whose weight inputs are new buffers already in ORT's layout; each helper op
translates 1:1 to its ORT op, and the buffers become the ONNX initializers. The helper ops' eager kernels
decode ORT's layout in plain PyTorch, so the repacking is tested against the qgraph ops without ORT.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import torch
import torch.nn.functional as F
from onnx.defs import OpSchema
from onnxscript import opset18, values
from torch import Tensor

from qgraph.quant.downcast import PACKED_MAX_BITS, unpack_codes

CONTRIB_DOMAIN = "com.microsoft"
CONTRIB_VERSION = 1
MIN_BLOCK = 16  # MatMulNBits and MatMulBnb4 take power-of-two blocks from 16 up
# MLAS' blocked 4-bit kernels take blocks of 16 to 256 (a larger block runs, through a slow dequantizing
# path): a per-channel row is laid out as blocks in that range that all carry the row's scale
MAX_NBITS_BLOCK = 256
NF4_QUANT_TYPE = 1  # MatMulBnb4's quant_type: 0 = FP4, 1 = NF4
# accuracy_level 1 = fp32: the activations enter the matmul as they are. Level 4 (what ORT's own quantizer
# and its QDQ fusion pick) rounds them to int8 first, ~1% of the logits' range on a small model: far
# outside the 1e-3 parity the export checks, and not the model that was trained.
FP32_ACCURACY_LEVEL = 1


# --- the contrib ops' schemas -------------------------------------------------------------------------------


def _formal(name: str, type_str: str, optional: bool = False) -> OpSchema.FormalParameter:
    option = OpSchema.FormalParameterOption.Optional if optional else OpSchema.FormalParameterOption.Single
    return OpSchema.FormalParameter(name, type_str, param_option=option)


def _int_attribute(name: str, default: int | None = None) -> OpSchema.Attribute:
    """A required int attribute, or an optional one with ORT's default (onnxscript writes defaults out)."""
    if default is None:
        return OpSchema.Attribute(name, OpSchema.AttrType.INT, required=True)
    return OpSchema.Attribute(name, onnx.helper.make_attribute(name, default), "")


FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def contrib_schemas() -> list[OpSchema]:
    """MatMulNBits and MatMulBnb4 as ORT 1.2x-1.3x declare them (inputs, attributes, types): what onnxscript
    needs to emit them. tests/export/test_onnx.py checks them against ORT's own where ORT exposes its schemas."""
    matmul_nbits = OpSchema(
        "MatMulNBits", CONTRIB_DOMAIN, CONTRIB_VERSION,
        inputs=[_formal("A", "T1"), _formal("B", "T2"), _formal("scales", "T1"),
                _formal("zero_points", "T3", optional=True), _formal("g_idx", "T4", optional=True),
                _formal("bias", "T1", optional=True)],
        outputs=[_formal("Y", "T1")],
        type_constraints=[("T1", FLOAT_TYPES, ""), ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)", *FLOAT_TYPES], ""), ("T4", ["tensor(int32)"], "")],
        attributes=[_int_attribute("K"), _int_attribute("N"), _int_attribute("block_size"),
                    _int_attribute("bits", 4), _int_attribute("accuracy_level", 0),
                    _int_attribute("weight_prepacked", 0)],
    )
    matmul_bnb4 = OpSchema(
        "MatMulBnb4", CONTRIB_DOMAIN, CONTRIB_VERSION,
        inputs=[_formal("A", "T1"), _formal("B", "T2"), _formal("absmax", "T1")],
        outputs=[_formal("Y", "T1")],
        type_constraints=[("T1", FLOAT_TYPES, ""), ("T2", ["tensor(uint8)"], "")],
        attributes=[_int_attribute("K"), _int_attribute("N"), _int_attribute("block_size"),
                    _int_attribute("quant_type"), _int_attribute("transB", 1), _int_attribute("training_mode", 0)],
    )
    return [matmul_nbits, matmul_bnb4]


def register_contrib_schemas() -> None:
    """Make the two ORT ops known to onnx (and so to onnxscript); a no-op where they already are."""
    for schema in contrib_schemas():
        if not onnx.defs.has(schema.name, schema.domain):
            onnx.defs.register_schema(schema)


# --- qgraph's weights in ORT's layouts ----------------------------------------------------------------------


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def nbits_block_size(group_size: int, in_features: int, storage_bits: int = 4) -> int:
    """MatMulNBits' block for a qgraph scale layout: the group itself; for per-channel scales (group_size
    <= 0, or one group of the whole row) every block of a row carries the row's scale, so any block holds
    the same weights: take the power of two in 16..256 that stores a row in the fewest bytes (codes padded
    past K with the zero point, plus one fp32 scale per block), the larger on a tie. K = 64 is one block
    of 64, K = 48 one block padded to 64, K = 576 (SmolLM2) nine blocks of 64 rather than three of 256 of
    which the last is three quarters padding. A group that is no power of two in 16..256 has no block:
    see `nbits_unsupported`."""
    if 0 < group_size < in_features:
        return group_size

    def row_bytes(block: int) -> int:
        n_blocks = -(-in_features // block)
        return n_blocks * block * storage_bits // 8 + 4 * n_blocks

    largest_first = [1 << p for p in range(MAX_NBITS_BLOCK.bit_length() - 1, MIN_BLOCK.bit_length() - 2, -1)]
    return min(largest_first, key=row_bytes)  # min keeps the first of equals


def nbits_unsupported(bits: int, group_size: int, in_features: int) -> str | None:
    """Why an int4_linear of these sizes has no MatMulNBits form, or None."""
    if bits > 8:
        return f"{bits}-bit weights: MatMulNBits holds at most 8 bits"
    is_block = is_power_of_two(group_size) and MIN_BLOCK <= group_size <= MAX_NBITS_BLOCK
    if 0 < group_size < in_features and not is_block:
        return (f"group size {group_size}: MatMulNBits blocks are powers of two from {MIN_BLOCK} to "
                f"{MAX_NBITS_BLOCK}; train with group_size=32, 64, 128 or 256, or per channel")
    return None


def nbits_storage_bits(bits: int) -> int:
    """MatMulNBits' `bits` for b-bit codes: 4 holds every b <= 4 exactly (3-bit codes -4..3 are 4..11
    unsigned), 8 every wider code."""
    return 4 if bits <= PACKED_MAX_BITS else 8


@dataclass(frozen=True)
class NBitsWeight:
    """One int4_linear's weight as MatMulNBits takes it."""

    packed: Tensor  # uint8 [N, n_blocks, block_size * bits / 8]
    scales: Tensor  # fp32 [N, n_blocks]
    bits: int  # 4 or 8
    block_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return int(self.packed.shape[0])


def nbits_weight(codes: Tensor, scale: Tensor, bits: int, group_size: int, in_features: int) -> NBitsWeight:
    """qgraph's b-bit codes (signed; packed low nibble first for b <= 4, int8 above) and fp32 scales
    (out, 1) or (out, in/group) -> MatMulNBits' unsigned blocks and per-block scales."""
    storage_bits = nbits_storage_bits(bits)
    block = nbits_block_size(group_size, in_features, storage_bits)
    signed = unpack_codes(codes, bits, in_features).to(torch.int16)
    out_features = signed.shape[0]
    n_blocks = -(-in_features // block)
    # ORT subtracts its default zero point 2^(bits-1): store code + 2^(bits-1); the padding past K is that
    # zero point, a zero weight (ORT never reads it against A, which has K columns)
    zero_point = 1 << (storage_bits - 1)
    unsigned = F.pad(signed + zero_point, (0, n_blocks * block - in_features), value=zero_point).to(torch.uint8)
    if storage_bits == 4:  # the first element of each pair in the low nibble
        unsigned = unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)
    packed = unsigned.reshape(out_features, n_blocks, -1).contiguous()
    # a per-channel scale is every block's scale of its row; group scales are one per block already
    scales = scale.float().expand(out_features, n_blocks) if scale.shape[1] == 1 else scale.float()
    return NBitsWeight(packed, scales.contiguous(), storage_bits, block, in_features)


def nf4_blocksize_unsupported(blocksize: int) -> str | None:
    if not (is_power_of_two(blocksize) and blocksize >= MIN_BLOCK):
        return f"NF4 block size {blocksize}: MatMulBnb4 takes powers of two from {MIN_BLOCK}"
    return None


def expanded_absmax(absmax: Tensor, nested_absmax: Tensor | None, nested_code: Tensor | None,
                    offset: Tensor | None, nested_blocksize: int) -> Tensor:
    """bitsandbytes' per-block absmax as plain fp32: double-quantized absmaxes (uint8 codes into an 8-bit
    table, one fp32 scale per nested block, plus the mean offset) decoded as bitsandbytes decodes them."""
    if nested_absmax is None:
        return absmax.float()
    nested_block = torch.arange(absmax.numel(), device=absmax.device) // nested_blocksize
    return (nested_code[absmax.long()] * nested_absmax[nested_block] + offset).float()


# --- the helper ops the rewritten graph calls ---------------------------------------------------------------


def dequantize_nbits(packed: Tensor, scales: Tensor, in_features: int, bits: int, block_size: int) -> Tensor:
    """MatMulNBits' weight [N, K] from its B and scales, as ORT defines it: (q - 2^(bits-1)) * scale."""
    out_features, n_blocks, _ = packed.shape
    if bits == 4:
        pairs = torch.stack([packed & 0xF, packed >> 4], dim=-1)  # low nibble first
        unsigned = pairs.reshape(out_features, n_blocks, block_size)
    else:
        unsigned = packed
    values = (unsigned.float() - (1 << (bits - 1))) * scales.unsqueeze(-1)
    return values.reshape(out_features, -1)[:, :in_features]


@torch.library.custom_op("qgraph_onnx::matmul_nbits", mutates_args=())
def matmul_nbits(x: Tensor, packed: Tensor, scales: Tensor, bias: Tensor | None, out_features: int,
                 in_features: int, bits: int, block_size: int) -> Tensor:
    """com.microsoft::MatMulNBits in PyTorch: y = x @ dequantize(B, scales)^T + bias."""
    weight = dequantize_nbits(packed, scales, in_features, bits, block_size)
    return F.linear(x, weight.to(x.dtype), bias)


@matmul_nbits.register_fake
def _(x, packed, scales, bias, out_features, in_features, bits, block_size):
    return x.new_empty((*x.shape[:-1], out_features))


NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)  # NF4's 16 levels (QLoRA), the table ORT's MatMulBnb4 decodes with


def dequantize_bnb4(packed: Tensor, absmax: Tensor, out_features: int, in_features: int, block_size: int) -> Tensor:
    """MatMulBnb4's NF4 weight [N, K]: the flattened weight, HIGH nibble first, times each block's absmax."""
    indices = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1).long()
    numel = out_features * in_features
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=packed.device)
    weight = levels[indices[:numel]] * absmax.repeat_interleave(block_size)[:numel]
    return weight.reshape(out_features, in_features)


@torch.library.custom_op("qgraph_onnx::matmul_bnb4", mutates_args=())
def matmul_bnb4(x: Tensor, packed: Tensor, absmax: Tensor, bias: Tensor | None, out_features: int,
                in_features: int, block_size: int) -> Tensor:
    """com.microsoft::MatMulBnb4 (NF4) in PyTorch, plus the bias ORT adds after it."""
    weight = dequantize_bnb4(packed, absmax, out_features, in_features, block_size)
    return F.linear(x, weight.to(x.dtype), bias)


@matmul_bnb4.register_fake
def _(x, packed, absmax, bias, out_features, in_features, block_size):
    return x.new_empty((*x.shape[:-1], out_features))


# --- their translations -------------------------------------------------------------------------------------

register_contrib_schemas()
_contrib = values.Opset(CONTRIB_DOMAIN, CONTRIB_VERSION)


def matmul_nbits_onnx(x, packed, scales, bias, out_features: int, in_features: int, bits: int, block_size: int):
    """qgraph_onnx::matmul_nbits -> one com.microsoft::MatMulNBits (bias as its own input: it is added in
    the kernel's fp32 output)."""
    return _contrib.MatMulNBits(x, packed, scales, None, None, bias, K=in_features, N=out_features, bits=bits,
                                block_size=block_size, accuracy_level=FP32_ACCURACY_LEVEL)


def matmul_bnb4_onnx(x, packed, absmax, bias, out_features: int, in_features: int, block_size: int):
    """qgraph_onnx::matmul_bnb4 -> com.microsoft::MatMulBnb4 (NF4), then an Add for a bias (it has none)."""
    y = _contrib.MatMulBnb4(x, packed, absmax, K=in_features, N=out_features, block_size=block_size,
                            quant_type=NF4_QUANT_TYPE, transB=1)
    return y if bias is None else opset18.Add(y, bias)


TRANSLATIONS = {
    torch.ops.qgraph_onnx.matmul_nbits.default: matmul_nbits_onnx,
    torch.ops.qgraph_onnx.matmul_bnb4.default: matmul_bnb4_onnx,
}
