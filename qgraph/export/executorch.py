"""The executorch target: a .pte program for ExecuTorch, decoder linears run by XNNPACK as 8da4w.

XNNPACK delegates a 4-bit linear only in torchao's "8da4w" pattern (int8 dynamic activations x int4
weights): on the activation, torch's `quantized_decomposed.choose_qparams_per_token_asymmetric`,
`quantize_per_token` and `dequantize_per_token`; on the weight, `dequantize_per_channel_group` of int8
codes in [-8, 7] with one scale per group; then `linear`. A weight-only int4 linear in that form is not
delegated and has no portable kernel, so only plans that train the activations' int8 rounding fit:
lrqat-w4a8, whose `qgraph::fake_quant_act_int8_per_token` is exactly that round trip.

Before export each such op pair is rewritten into the pattern (the codes unpacked to int8 buffers, which
XNNPACK repacks to 4 bits in the file), the program lowered with
`to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()`, and every linear is
checked to have been delegated: a linear left to the portable kernels would fail at runtime or run wrong.
The rest of the model (embedding, norms, attention, LM head) is fp32, delegated to XNNPACK where it takes
it. Sequence length is dynamic up to `max_seq_len` (ExecuTorch plans memory for the bound); batch too, up
to `max_batch`.

    from executorch.runtime import Runtime
    method = Runtime.get().load_program("model.pte").load_method("forward")
    (logits,) = method.execute([input_ids, attention_mask])   # int64 [batch, seq] each
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.nn.functional as F
from torch import Tensor, fx
from torch.export import Dim

from qgraph.errors import ExportError
from qgraph.export.aten import unpack_signed_nibbles
from qgraph.export.program import INPUT_NAMES, LogitsProgram
from qgraph.export.target import Artifact, ExportTarget
from qgraph.graph import copy_graph, get_attr_tensor, module_path
from qgraph.module import QGraphModule
from qgraph.ops.act_quant import FAKE_QUANT_ACT, QMAX, QMIN
from qgraph.ops.round_scale import rounding_deviation

if TYPE_CHECKING:
    from qgraph.export import ExportJob

if importlib.util.find_spec("executorch") is None:  # qgraph.export.get_target turns this into an install hint
    raise ModuleNotFoundError("the executorch target needs ExecuTorch: pip install -e '.[executorch]'",
                              name="executorch")

INT4_LINEAR = torch.ops.qgraph.int4_linear.default
NF4_LINEAR = torch.ops.qgraph.nf4_linear.default
quantized_decomposed = torch.ops.quantized_decomposed
WEIGHT_QMIN, WEIGHT_QMAX = -8, 7  # int4 codes, held in int8 for dequantize_per_channel_group
# XNNPACK's blockwise int4 kernels take groups of a multiple of 32 input columns (its node visitor asserts it)
GROUP_MULTIPLE = 32
PLAN_HINT = "use plan lrqat-w4a8 (int8 per-token activations x int4 weights, group 32), which trains for it"
PATTERN = ("8da4w -> XNNPACK: choose_qparams_per_token_asymmetric + quantize/dequantize_per_token on x, "
           "dequantize_per_channel_group on int4 codes, linear")
DEQUANTIZE_WEIGHT = "quantized_decomposed.dequantize_per_channel_group"
CODES_PREFIX = "executorch_int8_codes_"  # the unpacked codes' attribute names on the exported graph module


@dataclass(frozen=True)
class ExecuTorchOptions:
    # the longest sequence the program accepts: ExecuTorch needs a bound and plans its memory for it
    max_seq_len: int = 128
    max_batch: int = 4

    def __post_init__(self) -> None:
        for name in ("max_seq_len", "max_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ValueError(f"{name} must be an integer of at least 2, got {value!r}")


# --- what fits ------------------------------------------------------------------------------------------------


def _call_nodes(gm: fx.GraphModule, target) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


def group_codes(gm: fx.GraphModule, node: fx.Node) -> tuple[Tensor, Tensor]:
    """An int4_linear's int8 codes (out, in) and its scale (out, groups), as the module holds them."""
    _x, codes, scale, _bias, _bits, _group_size, in_features = node.args
    codes_int8 = unpack_signed_nibbles(get_attr_tensor(gm, codes.target), in_features).to(torch.int8)
    return codes_int8, get_attr_tensor(gm, scale.target).detach()


def positive_scales(codes: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """The same weights with every group's scale > 0, which XNNPACK requires (it refuses to load others):
    a negative scale's group has its codes negated (s c = |s| (-c)), a zero scale's group becomes codes 0
    with scale 1. Exact, unless a negated group held -8 (see negative_scale_problem)."""
    out_features, n_groups = scale.shape
    grouped = codes.reshape(out_features, n_groups, -1)
    sign = torch.where(scale < 0, -1, 1).to(torch.int8).unsqueeze(-1)
    grouped = torch.where((scale == 0).unsqueeze(-1), 0, grouped * sign).to(torch.int8)
    return grouped.reshape(codes.shape), torch.where(scale == 0, torch.ones_like(scale), scale.abs())


def negative_scale_problem(codes: Tensor, scale: Tensor) -> int:
    """How many groups have a negative scale and a code of -8, whose negation (+8) int4 cannot hold."""
    out_features, n_groups = scale.shape
    holds_min = (codes.reshape(out_features, n_groups, -1) == WEIGHT_QMIN).any(-1)
    return int(((scale < 0) & holds_min).sum())


def _int4_problem(gm: fx.GraphModule, node: fx.Node) -> str | None:
    x, _codes, _scale, _bias, bits, group_size, in_features = node.args
    where = module_path(node) or node.name
    if not (isinstance(x, fx.Node) and x.target == FAKE_QUANT_ACT):
        return (f"{where} is a weight-only int4 linear; XNNPACK runs 4-bit weights only with int8 dynamic "
                f"activations (8da4w), and weight-only int4 has no ExecuTorch kernel: {PLAN_HINT}")
    if bits != 4:
        return f"{where} has {bits}-bit weights; XNNPACK's 8da4w kernel takes 4-bit ones: {PLAN_HINT}"
    group = in_features if group_size <= 0 else group_size
    if group % GROUP_MULTIPLE:
        return (f"{where} has groups of {group} input columns; XNNPACK's 4-bit kernel takes multiples of "
                f"{GROUP_MULTIPLE}: {PLAN_HINT}")
    unfixable = negative_scale_problem(*group_codes(gm, node))
    if unfixable:
        return (f"{where} has {unfixable} group(s) whose trained scale went negative and that hold the code -8; "
                "XNNPACK takes positive scales only, and the sign flip that gives one makes that code +8, outside "
                "int4: train the scales with a smaller learning rate (LR-QAT's is 1e-5), or export to .pt2 / .onnx")
    return None


def unsupported(module: QGraphModule, options: ExecuTorchOptions) -> str | None:
    gm = module.graph_module
    if _call_nodes(gm, NF4_LINEAR):
        return f"NF4 weights have no ExecuTorch kernel: {PLAN_HINT}, or export nf4 to .onnx / .pt2"
    linears = _call_nodes(gm, INT4_LINEAR)
    if not linears:
        return f"the module has no int4 linears for XNNPACK's 8da4w kernel: {PLAN_HINT}"
    for node in linears:
        problem = _int4_problem(gm, node)
        if problem:
            return problem
    for node in _call_nodes(gm, FAKE_QUANT_ACT):
        others = [u.name for u in node.users if u.target != INT4_LINEAR]
        if others:
            return (f"int8 activation fake quant {node.name} also feeds {', '.join(others)}, which is not an int4 "
                    f"linear; only 8da4w linears have a runtime kernel: {PLAN_HINT}")
    return None


# --- the rewrite into the 8da4w pattern ----------------------------------------------------------------------


def per_token_int8_qdq(x: Tensor) -> Tensor:
    """x through the quantized_decomposed ops XNNPACK fuses into its dynamic int8 input quantization."""
    scale, zero_point = quantized_decomposed.choose_qparams_per_token_asymmetric(x, torch.int8)
    q = quantized_decomposed.quantize_per_token(x, scale, zero_point, QMIN, QMAX, torch.int8)
    return quantized_decomposed.dequantize_per_token(q, scale, zero_point, QMIN, QMAX, torch.int8, x.dtype)


def linear_8da4w(x: Tensor, codes: Tensor, scale: Tensor, zero_point: Tensor, bias: Tensor | None,
                 group_size: int) -> Tensor:
    """linear over dequantize_per_channel_group(int8 codes): the weight half of the 8da4w pattern."""
    weight = quantized_decomposed.dequantize_per_channel_group(
        codes, scale, zero_point, WEIGHT_QMIN, WEIGHT_QMAX, torch.int8, group_size, x.dtype)
    return F.linear(x, weight, bias)


def xnnpack_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over the same tensors (plus unpacked int8 codes) in the 8da4w pattern.

    The finalized module is left as it is: the graph is copied, and the new codes live on the copy."""
    graph = copy_graph(gm.graph)
    new_codes: dict[str, Tensor] = {}
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == INT4_LINEAR:
            fake_quant, _codes, _scale, bias, _bits, group_size, in_features = node.args
            name = f"{CODES_PREFIX}{len(new_codes) // 3}"
            # int8 codes in [-8, 7], as dequantize_per_channel_group reads them (XNNPACK packs them to 4 bits),
            # under positive scales (XNNPACK's requirement; the same weights)
            codes, scale = positive_scales(*group_codes(gm, node))
            new_codes[name], new_codes[f"{name}_scale"] = codes, scale
            # symmetric codes: zero points of 0, as a constant XNNPACK reads at export (None it refuses)
            new_codes[f"{name}_zero_point"] = torch.zeros(scale.shape, dtype=torch.int8)
            with graph.inserting_before(node):
                codes_node = graph.get_attr(name)
                scale_node = graph.get_attr(f"{name}_scale")
                zero_point_node = graph.get_attr(f"{name}_zero_point")
                # each linear quantizes its own input, as in torchao's 8da4w: XNNPACK fuses the activation's
                # quantization into the linear it feeds, one partition per linear
                x = graph.call_function(per_token_int8_qdq, (fake_quant.args[0],))
            node.target = linear_8da4w
            node.args = (x, codes_node, scale_node, zero_point_node, bias,
                         in_features if group_size <= 0 else group_size)
    for node in reversed(graph.nodes):  # the fake quants and packed codes nothing reads any more
        if (node.op == "get_attr" or node.target == FAKE_QUANT_ACT) and not node.users:
            graph.erase_node(node)
    graph.lint()
    # a dict root: GraphModule takes each get_attr / call_module target from it, by reference
    attrs = {n.target: _attribute(gm, n.target) for n in graph.nodes
             if n.op in ("get_attr", "call_module") and n.target not in new_codes}
    return fx.GraphModule({**attrs, **new_codes}, graph, class_name=type(gm).__name__)


def _attribute(gm: fx.GraphModule, qualified_name: str) -> object:
    value: object = gm
    for part in qualified_name.split("."):
        value = getattr(value, part)
    return value


def xnnpack_program(module: QGraphModule) -> LogitsProgram:
    program = LogitsProgram(module)
    program.graph_module = xnnpack_graph(module.graph_module)
    return program


def dynamic_shapes(options: ExecuTorchOptions) -> dict[str, dict[int, Dim]]:
    batch = Dim("batch", min=1, max=options.max_batch)
    seq = Dim("seq", min=1, max=options.max_seq_len)
    return {name: {0: batch, 1: seq} for name in INPUT_NAMES}


# --- lowering -------------------------------------------------------------------------------------------------


def lowered_op_counts(edge) -> tuple[Counter[str], Counter[str], int]:
    """(ops inside XNNPACK delegates, ops left outside them, delegate calls) of a lowered edge program."""
    from executorch.exir.lowered_backend_module import get_lowered_submodules

    top = edge.exported_program().graph_module
    delegated: Counter[str] = Counter()
    calls = 0
    for _name, lowered, _node in get_lowered_submodules(top):
        calls += 1
        delegated.update(_op_name(n) for n in lowered.original_module.graph.nodes if n.op == "call_function")
    outside = Counter(_op_name(n) for n in top.graph.nodes if n.op == "call_function")
    return delegated, outside, calls


def _op_name(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.removesuffix(".default")


def _is_linear(name: str) -> bool:
    return name.startswith(("aten.linear", "aten.addmm", "aten.mm", "aten.bmm", "aten.convolution")) \
        or "dequantize_per_channel_group" in name


def delegation_problem(delegated: Counter[str], outside: Counter[str], n_linears: int) -> str | None:
    """Why the lowered program is not what was meant (a linear or a weight dequantization left outside
    XNNPACK, where ExecuTorch has no kernel for it or runs it in float), or None."""
    left = {name: count for name, count in outside.items() if _is_linear(name)}
    taken = delegated[DEQUANTIZE_WEIGHT]
    if left or taken != n_linears:
        return (f"XNNPACK did not take every 8da4w linear: {n_linears} int4 linears, {taken} delegated; "
                f"left to the portable kernels: {left or 'none'}")
    return None


def bf16_scale_note(module: QGraphModule) -> str:
    """What XNNPACK's bf16 group scales do to the trained ones: nothing when trained bf16-exact (lrqat-w4a8)."""
    gm = module.graph_module
    deviation = max((rounding_deviation(get_attr_tensor(gm, node.args[2].target), "bfloat16")
                     for node in _call_nodes(gm, INT4_LINEAR)), default=0.0)
    if deviation == 0.0:
        return "XNNPACK stores the group scales in bf16: the trained scales are bf16-exact, the .pte holds them as trained"
    return (f"XNNPACK stores the group scales in bf16, which moves the trained fp32 scales by up to {deviation:.2e} "
            "of themselves (on SmolLM2 that moved the logits by a sixth of their range): train with "
            "scale_dtype='bfloat16', lrqat-w4a8's default, for a .pte that holds the trained scales")


def write(job: ExportJob) -> Artifact:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    options: ExecuTorchOptions = job.options
    module = job.module
    example = {name: job.example_inputs[name][:options.max_batch, :options.max_seq_len] for name in INPUT_NAMES}
    exported = torch.export.export(xnnpack_program(module), (), kwargs=example,
                                   dynamic_shapes=dynamic_shapes(options), strict=False)
    edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    delegated, outside, calls = lowered_op_counts(edge)
    n_linears = len(_call_nodes(module.graph_module, INT4_LINEAR))
    problem = delegation_problem(delegated, outside, n_linears)
    if problem:
        raise ExportError(f"{problem}. Nothing was written")
    program = edge.to_executorch()
    job.path.write_bytes(program.buffer)
    n_fake_quant = len(_call_nodes(module.graph_module, FAKE_QUANT_ACT))
    mapping = {
        f"qgraph::int4_linear x{n_linears}": f"{PATTERN} ({n_linears} of {n_linears} delegated)",
        f"qgraph::fake_quant_act_int8_per_token x{n_fake_quant}": "XNNPACK dynamic int8 per-token quantization "
                                                                  "(qd8) of the linear's input",
        "XNNPACK delegate": f"{calls} delegate call(s) holding {sum(delegated.values())} ops; "
                            f"{sum(outside.values()) - calls} ops left to portable kernels",
    }
    notes = [f"sequence length dynamic up to {options.max_seq_len}, batch up to {options.max_batch} "
             "(ExecuTorch plans memory for the bounds; max_seq_len=/max_batch= raise them)",
             bf16_scale_note(module)]
    return Artifact(op_mapping=mapping, notes=notes)


TARGET = ExportTarget(
    name="executorch",
    suffixes=(".pte",),
    description="ExecuTorch program, decoder linears as 8da4w on XNNPACK (Runtime.get().load_program(path))",
    options_type=ExecuTorchOptions,
    unsupported=unsupported,
    write=write,
    runner="pte.py",  # a runner named like the package it imports would read as that package to a reader
    tolerance=1e-4,
    # XNNPACK's qd8 conversion picks the same int8 codes as torch's reference but for about 4 in a million, at
    # .5 ties (measured on 3.3M random activations): a few tenths of a % of a tiny model's logits' range. In
    # SmolLM2 those flips grow through 30 layers as far as a one-ulp change of the weights does, which the
    # check's rounding floor (check.rounding_floor) allows for
    relative_tolerance=0.01,
)
