"""fold_lrqat: every `qgraph::lrqat_linear` becomes `qgraph::int4_linear` over its trained integer weight.

W_int = clamp(round(phi^-1(Phi0) + (alpha/r) A @ B)) is computed once and stored as b-bit codes (two per
byte for b <= 4) with the trained scale s; Phi0, A and B are dropped. Both ops dequantize through the
same function, so the folded graph's output equals the trained graph's bit for bit.

A scale read through `qgraph::round_scale` (the lrqat pass's scale_dtype="float16") is folded rounded, as
the trained forward saw it: the deployed scales are then exact in that format (what GGUF stores).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from qgraph.graph import get_attr_tensor, module_path
from qgraph.ops.int4 import fold_lrqat_weight
from qgraph.ops.round_scale import is_round_scale, round_scale_reference, scale_source
from qgraph.pipeline import PassContext, PassResult, PassSpec, options_dict
from qgraph.report import REWRITTEN, SKIPPED, PassReport, SiteRecord

PASS_NAME = "fold_lrqat"
PHI0_ATTR = "lrqat_phi0"  # what the lrqat pass names Phi0; the folded tensors take its prefix
CODES, SCALE = "int4_codes", "int4_scale"


@dataclass(frozen=True)
class FoldLRQATOptions:
    """No options: the fold is determined by the trained layer."""


def fold_lrqat(gm: fx.GraphModule, context: PassContext, options: FoldLRQATOptions) -> PassResult:
    report = PassReport(PASS_NAME, options_dict(options))
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.qgraph.lrqat_linear.default]
    report.matched = len(nodes)
    if not nodes:
        report.notes.append("no qgraph::lrqat_linear in the graph: nothing to fold")
    for node in nodes:
        path = module_path(node)
        weights = (*node.args[1:4], scale_source(node.args[4]))
        if node.kwargs or not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in weights):
            report.records.append(SiteRecord(path or node.name, SKIPPED, reason=(
                f"{node.name} does not read Phi0, A, B and s as module attributes in positional arguments "
                "(s possibly through qgraph::round_scale; not made by the lrqat pass); fold it by hand or "
                "re-run lrqat")))
            continue
        report.records.append(_fold(gm, context, node, path))
    return PassResult(gm, modified=bool(report.rewritten), report=report)


def _fold(gm: fx.GraphModule, context: PassContext, node: fx.Node, path: str) -> SiteRecord:
    x, phi0_node, a_node, b_node, scale_arg, bias, bits, group_size, lora_scale, phi_format = node.args
    scale_node = scale_source(scale_arg)
    phi0, lora_a, lora_b, scale = (get_attr_tensor(gm, n.target) for n in (phi0_node, a_node, b_node, scale_node))
    if is_round_scale(scale_arg):  # the value the trained forward multiplied by, not the fp32 parameter
        scale = round_scale_reference(scale.detach(), scale_arg.args[1])

    def fold() -> tuple[torch.Tensor, torch.Tensor]:
        codes, folded = fold_lrqat_weight(phi0, lora_a, lora_b, scale, bits, group_size, lora_scale, phi_format)
        # a buffer of its own: the trained parameter it came from must not share (or keep alive) its storage
        return codes, folded.clone()

    codes, folded_scale = context.make_once((PASS_NAME, phi0_node.target), fold)
    out_features, in_features = lora_a.shape[0], lora_b.shape[1]

    owner_name, _, phi0_attr = phi0_node.target.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    prefix = phi0_attr[: -len(PHI0_ATTR)] if phi0_attr.endswith(PHI0_ATTR) else f"{phi0_attr}_"
    names = {CODES: _free_name(owner, prefix + CODES), SCALE: _free_name(owner, prefix + SCALE)}
    owner.register_buffer(names[CODES], codes)
    owner.register_buffer(names[SCALE], folded_scale)

    graph = gm.graph
    with graph.inserting_before(node):
        attrs = [graph.get_attr(f"{owner_name}.{names[k]}" if owner_name else names[k]) for k in (CODES, SCALE)]
        new = graph.call_function(torch.ops.qgraph.int4_linear.default,
                                  (x, *attrs, bias, bits, group_size, in_features))
    new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "val")})
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    if is_round_scale(scale_arg) and not scale_arg.users:
        graph.erase_node(scale_arg)
    bytes_before = sum(t.numel() * t.element_size() for t in (phi0, lora_a, lora_b, scale))
    for attr in (phi0_node, a_node, b_node, scale_node):
        _drop_if_unused(gm, attr.target)

    grouping = f"g{group_size}" if group_size > 0 else "per-channel"
    packing = "packed 2/byte" if codes.dtype == torch.uint8 else "int8"
    rounding = f" scales {scale_arg.args[1]}-exact" if is_round_scale(scale_arg) else ""
    return SiteRecord(
        path or owner_name, REWRITTEN, params=out_features * in_features, bytes_before=bytes_before,
        bytes_after=codes.numel() * codes.element_size() + folded_scale.numel() * folded_scale.element_size(),
        detail=f"{out_features}x{in_features} int{bits} {grouping} {packing}{rounding}")


def _free_name(owner: torch.nn.Module, name: str) -> str:
    candidate, i = name, 1
    while hasattr(owner, candidate):
        candidate, i = f"{name}_{i}", i + 1
    return candidate


def _drop_if_unused(gm: fx.GraphModule, qualified_name: str) -> None:
    readers = list(gm.graph.find_nodes(op="get_attr", target=qualified_name))
    for reader in readers:
        if not reader.users:
            gm.graph.erase_node(reader)
    if not gm.graph.find_nodes(op="get_attr", target=qualified_name):
        owner, _, attr = qualified_name.rpartition(".")
        delattr(gm.get_submodule(owner) if owner else gm, attr)


PASS = PassSpec(PASS_NAME, fold_lrqat, FoldLRQATOptions,
                "qgraph::lrqat_linear -> qgraph::int4_linear (trained weight folded to b-bit codes + scale, frozen)")
