"""qgraph's ops as standard aten: the program the pt2 and aoti targets write.

A saved `torch.export` program that calls `qgraph::int4_linear` or `qgraph::nf4_linear` loads only where
qgraph is imported, and AOTInductor cannot run a Python custom op at all. So before export each such node
is replaced by a call to a plain-PyTorch function below that reads the same packed bytes: export traces it
into bitwise ops, a table lookup, multiplies and a matmul. The weights stay packed (uint8 codes, fp32
scales, bitsandbytes' double-quantized absmax): the program decodes them on every call.

`int4_linear_aten` does the op's float operations in the op's order (`scaled_linear`), so a decomposed
int4 layer equals the op bit for bit; `nf4_linear_aten` decodes NF4 the way `decode_nf4` does, which
differs from bitsandbytes' CPU kernel by float rounding only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from qgraph.errors import ExportError
from qgraph.export.program import LogitsProgram
from qgraph.graph import graph_copy
from qgraph.ops.act_quant import fake_quant_per_token_reference
from qgraph.module import QGraphModule

INT4_LINEAR = torch.ops.qgraph.int4_linear.default
NF4_LINEAR = torch.ops.qgraph.nf4_linear.default
PACKED_MAX_BITS = 4  # b-bit codes are packed two per byte up to here, int8 above (qgraph.quant.downcast)


# --- the decompositions -------------------------------------------------------------------------------------


def unpack_signed_nibbles(packed: Tensor, in_features: int) -> Tensor:
    """uint8 (out, ceil(in/2)), two 4-bit two's complement codes per byte, LOW nibble = even column ->
    int16 codes (out, in) in [-8, 7]."""
    wide = packed.to(torch.int16)  # shifts and the sign extension need a signed type wider than 4 bits
    low, high = wide & 0xF, (wide >> 4) & 0xF
    nibbles = torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)[:, :in_features]
    return (nibbles ^ 8) - 8  # sign-extends a 4-bit two's complement number


def int4_linear_aten(x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None, bits: int, group_size: int,
                     in_features: int) -> Tensor:
    """`qgraph::int4_linear` in aten: y = x @ (s * codes)^T + bias, computed as the op computes it."""
    w_int = unpack_signed_nibbles(codes, in_features) if bits <= PACKED_MAX_BITS else codes
    # the weight is rebuilt in the scale's dtype promoted to float32 (qgraph.ops.lrqat.weight_dtype)
    rebuild_dtype = torch.promote_types(scale.dtype, torch.float32)
    if scale.shape[1] == 1:  # per output channel: scale the output, as the op does
        y = (F.linear(x, w_int.to(x.dtype)) * scale[:, 0]).to(x.dtype)
        return y if bias is None else y + bias
    out_features, n_groups = scale.shape
    grouped = w_int.to(rebuild_dtype).reshape(out_features, n_groups, in_features // n_groups)
    weight = (grouped * scale.to(rebuild_dtype).unsqueeze(-1)).reshape(out_features, in_features)
    return F.linear(x, weight.to(x.dtype), bias)


def nf4_absmax(absmax: Tensor, nested_absmax: Tensor | None, nested_code: Tensor | None, offset: Tensor | None,
               nested_blocksize: int) -> Tensor:
    """The fp32 absmax per block: double-quantized ones (uint8 codes into an 8-bit table, one fp32 absmax per
    nested block, plus the mean offset) expanded."""
    if nested_absmax is None:
        return absmax
    nested_block = torch.arange(absmax.shape[0], device=absmax.device) // nested_blocksize
    return nested_code[absmax.long()] * nested_absmax[nested_block] + offset


def nf4_linear_aten(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Tensor | None,
                    nested_code: Tensor | None, offset: Tensor | None, bias: Tensor | None, out_features: int,
                    in_features: int, blocksize: int, nested_blocksize: int) -> Tensor:
    """`qgraph::nf4_linear` in aten: bitsandbytes' NF4 bytes (HIGH nibble first, blocks over the flattened
    weight) through the 16-level table, times each block's absmax, then a matmul."""
    flat = packed.reshape(-1)
    indices = torch.stack([flat >> 4, flat & 0xF], dim=-1).reshape(-1).long()
    numel = out_features * in_features
    block_scale = nf4_absmax(absmax, nested_absmax, nested_code, offset, nested_blocksize)
    # a block may straddle two rows (in_features % blocksize != 0): the scale is laid over the flat weight
    weight = code[indices[:numel]] * block_scale.repeat_interleave(blocksize)[:numel]
    return F.linear(x, weight.reshape(out_features, in_features).to(x.dtype),
                    None if bias is None else bias.to(x.dtype))


# qgraph op -> (its aten decomposition, what the report says it became)
DECOMPOSITIONS: dict[torch._ops.OpOverload, tuple[Callable[..., Tensor], str]] = {
    torch.ops.qgraph.fake_quant_act_int8_per_token.default: (
        fake_quant_per_token_reference, "aten: per-token int8 asymmetric quantize + dequantize (lrqat-w4a8)"),
    INT4_LINEAR: (int4_linear_aten, "aten: bitwise unpack + mul + linear (codes stay uint8)"),
    NF4_LINEAR: (nf4_linear_aten, "aten: nibble unpack + 16-level table lookup + absmax mul + linear "
                                  "(codes stay uint8, absmax stays double-quantized)"),
}


# --- the graph rewrite --------------------------------------------------------------------------------------


def op_label(op: torch._ops.OpOverload) -> str:
    """`qgraph::int4_linear` for torch.ops.qgraph.int4_linear.default."""
    return op.name().removesuffix(".default")


def qgraph_op_counts(graph: fx.Graph) -> Counter[str]:
    """How many nodes of each qgraph op (any `qgraph::` call) the graph holds."""
    counts: Counter[str] = Counter()
    for node in graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
                and node.target.namespace == "qgraph":
            counts[op_label(node.target)] += 1
    return counts


def op_mapping(graph: fx.Graph, *, keep_ops: bool = False) -> dict[str, str]:
    """Artifact.op_mapping: {"qgraph::int4_linear x14": "aten: ..."} for the qgraph ops in `graph`."""
    results = {op_label(op): text for op, (_, text) in DECOMPOSITIONS.items()}
    return {f"{label} x{count}": "kept as the qgraph op (loads only where qgraph is imported)" if keep_ops
            else results.get(label, "left as it is") for label, count in qgraph_op_counts(graph).items()}


def decompose_qgraph_ops(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over the same tensors in which every qgraph op node calls its aten decomposition.

    The graph is copied, not changed in place: the finalized module keeps its fused ops. Raises ExportError
    naming a qgraph op that has no decomposition (a new op must get one here).
    """
    copied = graph_copy(gm)
    graph = copied.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload) \
                or node.target.namespace != "qgraph":
            continue
        if node.target not in DECOMPOSITIONS:
            raise ExportError(f"{op_label(node.target)} has no aten decomposition in qgraph.export.aten; export "
                              "a finalized module (qgraph.finalize), whose graph holds only deployable ops")
        node.target = DECOMPOSITIONS[node.target][0]
    graph.lint()
    copied.recompile()
    return copied


def aten_program(module: QGraphModule) -> LogitsProgram:
    """(input_ids, attention_mask) -> logits over `module` (finalized) with its qgraph ops in aten."""
    program = LogitsProgram(module)
    program.graph_module = decompose_qgraph_ops(module.graph_module)
    return program
