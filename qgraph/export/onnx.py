"""The onnx target: a finalized model as an ONNX file that ONNX Runtime runs on CPU, its weights still 4-bit.

`qgraph::int4_linear` (LR-QAT, PEQA, RTN) becomes `com.microsoft::MatMulNBits` and `qgraph::nf4_linear` (nf4,
qst-nf4's backbone) `com.microsoft::MatMulBnb4`; everything else (and qst-nf4's side network) is ordinary
torch ops that torch.onnx's dynamo exporter translates.

How: torch.onnx translates one torch op at a time into ONNX and cannot repack a weight on the way. So a copy
of the finalized graph (same tensors, by reference) is rewritten first: each qgraph op node becomes a helper
op of qgraph.export.onnx_ops that reads new buffers already in ORT's layout (MatMulNBits' unsigned blocks and
per-block scales; MatMulBnb4's bytes as bitsandbytes packs them with the absmax expanded to fp32), and that
helper op translates 1:1 to its ORT op, so the repacked buffers are the initializers the ORT ops read.
Dead codes and scales drop out of the copy. MatMulNBits is told accuracy_level 1 (fp32 activations; ORT's
int8 level would move the logits far past the check's 1e-3). The file holds int64 inputs `input_ids` and
`attention_mask` ([batch, seq], both axes dynamic) and `logits`; past 2 GB the weights go into `<name>.data`
beside it.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from qgraph.export import onnx_ops
from qgraph.decode import dynamic_shapes as decode_dynamic_shapes
from qgraph.decode import signature_args
from qgraph.export.program import (DECODE_NOTE, INPUT_NAMES, LogitsProgram, decode_names, decode_unsupported,
                                   dynamic_shapes, output_dtype)
from qgraph.export.target import Artifact, ExportTarget
from qgraph.graph import get_attr_tensor, graph_copy
from qgraph.module import QGraphModule

INT4_LINEAR = torch.ops.qgraph.int4_linear.default
NF4_LINEAR = torch.ops.qgraph.nf4_linear.default
PROTOBUF_LIMIT_BYTES = 2 * 1024**3  # a protobuf message (the .onnx file) holds at most 2 GB
OPSET = 18  # torch.onnx's own opset (its aten translations and ours are written against it); ORT 1.14+ runs it
OUTPUT_NAMES = ("logits",)
# warns, on every export, of torchvision ops it skips registering when torchvision is not installed
TORCH_ONNX_REGISTRY_LOGGER = "torch.onnx._internal.exporter._registration"


@dataclass(frozen=True)
class OnnxOptions:
    """external_data: weights in `<file>.data` beside the model (None: only when they pass 2 GB). decode: the
    KV-cache signature (qgraph.decode: past_attention_mask, position_ids, past_i in; logits, present_i out)."""

    external_data: bool | None = None
    decode: bool = False


# --- what the target can express ----------------------------------------------------------------------------


def qgraph_nodes(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
            and n.target.namespace == "qgraph"]


def _node_unsupported(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if node.target == INT4_LINEAR:
        _, _, _, _, bits, group_size, in_features = node.args
        return onnx_ops.nbits_unsupported(bits, group_size, in_features)
    if node.target == NF4_LINEAR:
        code = get_attr_tensor(gm, node.args[3].target)
        levels = torch.tensor(onnx_ops.NF4_LEVELS)
        if code.shape != levels.shape or not torch.allclose(code.float().cpu(), levels, atol=1e-6, rtol=0):
            return "a 4-bit table other than NF4's: MatMulBnb4 decodes with NF4's own levels"
        return onnx_ops.nf4_blocksize_unsupported(node.args[10])
    return f"{node.target.name().removesuffix('.default')} has no translation to ONNX in this target"


def unsupported(module: QGraphModule, options: OnnxOptions) -> str | None:
    if output_dtype(module) == torch.bfloat16:  # the file was written, then failed to load in ORT
        return ("ONNX Runtime's CPU kernels take no bfloat16 (Mul has none), so a bfloat16 module's file could not "
                "run; export a float32 module (transform without dtype=torch.bfloat16; its weights stay 4-bit)")
    gm = module.graph_module
    for node in qgraph_nodes(gm.graph):
        why = _node_unsupported(gm, node)
        if why is not None:
            return why
    return decode_unsupported(module) if options.decode else None


# --- the rewrite to ORT's layouts ---------------------------------------------------------------------------


def _buffer_name(node: fx.Node) -> str:
    """A flat attribute name for the node's repacked weight, from its codes' qualified name."""
    return "ort_" + node.args[1].target.rpartition(".")[0].replace(".", "_")


def _buffer(gm: fx.GraphModule, name: str, tensor: torch.Tensor) -> fx.Node:
    """`tensor` as a new buffer of `gm` and the get_attr node that reads it (at the graph's insert point)."""
    gm.register_buffer(name, tensor.contiguous())
    return gm.graph.get_attr(name)


def _tensor(gm: fx.GraphModule, node: fx.Node | None) -> torch.Tensor | None:
    return None if node is None else get_attr_tensor(gm, node.target)


def _activation_dtype(node: fx.Node) -> torch.dtype:
    """The dtype the op computes in: ORT wants scales and absmax in the activations' type."""
    value = node.meta.get("val")
    return value.dtype if isinstance(value, torch.Tensor) else torch.float32


def _repack_int4(gm: fx.GraphModule, node: fx.Node) -> tuple[Any, tuple]:
    x, codes, scale, bias, bits, group_size, in_features = node.args
    weight = onnx_ops.nbits_weight(_tensor(gm, codes), _tensor(gm, scale), bits, group_size, in_features)
    name = _buffer_name(node)
    packed = _buffer(gm, name + "_B", weight.packed)
    scales = _buffer(gm, name + "_scales", weight.scales.to(_activation_dtype(node)))
    return torch.ops.qgraph_onnx.matmul_nbits.default, (
        x, packed, scales, bias, weight.out_features, in_features, weight.bits, weight.block_size)


def _repack_nf4(gm: fx.GraphModule, node: fx.Node) -> tuple[Any, tuple]:
    x, packed, absmax, _, nested_absmax, nested_code, offset, bias, out_features, in_features, blocksize, \
        nested_blocksize = node.args
    fp32_absmax = onnx_ops.expanded_absmax(_tensor(gm, absmax), _tensor(gm, nested_absmax),
                                           _tensor(gm, nested_code), _tensor(gm, offset), nested_blocksize)
    name = _buffer_name(node)
    flat_packed = _buffer(gm, name + "_B", _tensor(gm, packed).reshape(-1))
    absmax_node = _buffer(gm, name + "_absmax", fp32_absmax.to(_activation_dtype(node)))
    return torch.ops.qgraph_onnx.matmul_bnb4.default, (
        x, flat_packed, absmax_node, bias, out_features, in_features, blocksize)


REPACKERS = {INT4_LINEAR: _repack_int4, NF4_LINEAR: _repack_nf4}


def ort_layout_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over the same tensors in which each qgraph op calls its ORT helper op on repacked
    buffers; the finalized module is not changed."""
    new = graph_copy(gm)
    for node in qgraph_nodes(new.graph):
        with new.graph.inserting_before(node):
            target, args = REPACKERS[node.target](new, node)
            node.replace_all_uses_with(new.graph.call_function(target, args))
        new.graph.erase_node(node)
    unread = [n for n in new.graph.nodes if n.op == "get_attr" and not n.users]
    for node in unread:
        new.graph.erase_node(node)  # the qgraph layouts, now read by nothing: not in the file
    still_read = {n.target for n in new.graph.nodes if n.op == "get_attr"}
    for target in {n.target for n in unread} - still_read:  # two get_attr nodes may read one attribute
        _drop_attribute(new, gm, target)
    new.graph.lint()
    new.recompile()
    return new


def _drop_attribute(new: fx.GraphModule, original: fx.GraphModule, target: str) -> None:
    """Remove `target` from the copy (its containers are the copy's own, unless shared with the original:
    then it stays, an unread buffer that export ignores)."""
    owner_name, _, attr = target.rpartition(".")
    owner = new.get_submodule(owner_name) if owner_name else new
    if owner is not (original.get_submodule(owner_name) if owner_name else original):
        delattr(owner, attr)


def op_mapping(gm: fx.GraphModule) -> dict[str, str]:
    nodes = qgraph_nodes(gm.graph)
    counts = Counter(n.target for n in nodes)
    storage_bits = sorted({onnx_ops.nbits_storage_bits(n.args[4]) for n in nodes if n.target == INT4_LINEAR})
    became = {INT4_LINEAR: f"com.microsoft::MatMulNBits (bits {'/'.join(map(str, storage_bits))}, "
                           f"fp32 activations: accuracy_level {onnx_ops.FP32_ACCURACY_LEVEL})",
              NF4_LINEAR: "com.microsoft::MatMulBnb4 (NF4, absmax expanded to fp32)"}
    mapping = {f"{op.name().removesuffix('.default')} x{n}": became[op] for op, n in counts.items()}
    side = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "qst_side"]
    if side:
        mapping["qst_side (side network)"] = "standard ONNX ops"
    return mapping


# --- the writer ---------------------------------------------------------------------------------------------


@contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _drop_node_metadata(model: Any) -> None:
    """torch.onnx records each node's FX node, stack trace and source paths as metadata: debugging aid,
    most of a small model's file, and local paths in a file that is shipped."""
    for node in model.graph.all_nodes():
        node.metadata_props.clear()


def write(job: Any) -> Artifact:
    """torch.onnx (dynamo) over the rewritten graph; `job` is qgraph.export.ExportJob."""
    module: QGraphModule = job.module
    if job.options.decode:
        decode = module.tied_decode_graph()
        program = ort_layout_graph(decode.graph_module)
        args, kwargs = signature_args(decode.example_inputs), {}
        shapes = decode_dynamic_shapes(decode.past_count, module.info.max_seq_len)
        input_names, output_names = decode_names(module)
    else:
        program = LogitsProgram(module)
        program.graph_module = ort_layout_graph(module.graph_module)
        args, kwargs, shapes = (), dict(job.example_inputs), dynamic_shapes(module)
        input_names, output_names = list(INPUT_NAMES), list(OUTPUT_NAMES)
    program.eval()
    with warnings.catch_warnings(), torch.no_grad(), _quiet_logger(TORCH_ONNX_REGISTRY_LOGGER):
        warnings.simplefilter("ignore")  # torch.export's and onnxscript's notes on a successful export
        onnx_program = torch.onnx.export(
            program, args, kwargs=kwargs, dynamic_shapes=shapes, dynamo=True,
            custom_translation_table=onnx_ops.TRANSLATIONS, input_names=input_names,
            output_names=output_names, opset_version=OPSET, optimize=True, verbose=False)
    weight_bytes = sum(t.numel() * t.element_size() for t in program.state_dict().values())
    external = job.options.external_data
    if external is None:
        external = weight_bytes > PROTOBUF_LIMIT_BYTES * 0.95  # the graph itself takes room too
    _drop_node_metadata(onnx_program.model)
    onnx_program.save(job.path, external_data=external)
    data_file = job.path.with_name(job.path.name + ".data")
    notes = [DECODE_NOTE] if job.options.decode else []
    if external:
        notes.append(f"weights in {data_file.name} beside the model (keep the two files together)")
    return Artifact(op_mapping=op_mapping(module.graph_module), notes=notes,
                    extra_files=[data_file] if data_file.exists() else [])


TARGET = ExportTarget(
    name="onnx",
    suffixes=(".onnx",),
    description="ONNX for ONNX Runtime (CPU): int4 as com.microsoft::MatMulNBits, NF4 as MatMulBnb4",
    options_type=OnnxOptions,
    unsupported=unsupported,
    write=write,
    runner="onnx.py",
    tolerance=1e-3,
)

__all__ = ["OnnxOptions", "TARGET", "ort_layout_graph", "unsupported", "write"]
