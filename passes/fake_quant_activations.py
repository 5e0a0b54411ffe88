"""fake_quant_activations: each quantized decoder linear reads its input through int8 per-token fake quant.

For plans that deploy as "8da4w" (int8 dynamic activations x int4 weights, ExecuTorch/XNNPACK): the
input of every `qgraph::lrqat_linear` (and `qgraph::int4_linear`) inside a decoder block goes through
`qgraph::fake_quant_act_int8_per_token`, the runtime's per-token asymmetric int8 round trip bit for bit,
so training sees the activations the deployed kernel will see. Linears that read the same tensor (q/k/v,
gate/up) share one fake-quant node: the runtime quantizes that tensor once per linear, identically.

Runs after `lrqat` and before `insert_checkpoints` (the new nodes must be inside the blocks it outlines;
they carry their first reader's module path). `fold_lrqat` leaves them in place: the finalized forward is
the trained forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from qgraph.graph import as_patterns, decoder_blocks, matches_any, module_path
from qgraph.ops.act_quant import FAKE_QUANT_ACT
from qgraph.pipeline import PassContext, PassResult, PassSpec, options_dict
from qgraph.report import ADDED, SKIPPED, PassReport, SiteRecord

PASS_NAME = "fake_quant_activations"
# the quantized linears whose inputs the runtime quantizes to int8 (their x is the first argument)
QUANTIZED_LINEARS = (torch.ops.qgraph.lrqat_linear.default, torch.ops.qgraph.int4_linear.default)


@dataclass(frozen=True)
class FakeQuantActivationsOptions:
    # module-path globs of the linears; None selects every quantized linear inside a decoder block
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "include", as_patterns(self.include))
        object.__setattr__(self, "exclude", as_patterns(self.exclude) or ())


def quantized_linears(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in QUANTIZED_LINEARS]


def _selected(path: str, block_prefixes: tuple[str, ...], options: FakeQuantActivationsOptions) -> bool:
    chosen = matches_any(path, options.include) if options.include is not None else \
        bool(block_prefixes) and path.startswith(block_prefixes)
    return chosen and not matches_any(path, options.exclude)


def fake_quant_activations(gm: fx.GraphModule, context: PassContext,
                           options: FakeQuantActivationsOptions) -> PassResult:
    report = PassReport(PASS_NAME, options_dict(options))
    block_prefixes = tuple(block.path + "." for block in decoder_blocks(gm))
    linears = [n for n in quantized_linears(gm) if _selected(module_path(n), block_prefixes, options)]
    report.matched = len(linears)
    if not linears:
        report.notes.append("no qgraph::lrqat_linear or qgraph::int4_linear selected: run the lrqat pass first "
                            "(plan lrqat-w4a8 does)")
    # one fake-quant node per distinct input tensor, shared by the linears that read it
    quantized: dict[fx.Node, fx.Node] = {}
    for linear in linears:
        path = module_path(linear) or linear.name
        x = linear.args[0]
        if isinstance(x, fx.Node) and x.op == "call_function" and x.target == FAKE_QUANT_ACT:
            report.records.append(SiteRecord(path, SKIPPED, reason="its input is already fake-quantized"))
            continue
        if x not in quantized:
            quantized[x] = _insert_fake_quant(gm.graph, x, linear)
        linear.args = (quantized[x], *linear.args[1:])
        report.records.append(SiteRecord(path, ADDED, detail="input: int8 per-token asymmetric fake quant"))
    return PassResult(gm, modified=bool(quantized), report=report)


def _insert_fake_quant(graph: fx.Graph, x: fx.Node, first_reader: fx.Node) -> fx.Node:
    with graph.inserting_after(x):
        node = graph.call_function(FAKE_QUANT_ACT, (x,))
    # the module path of the linear it feeds: decoder_blocks and insert_checkpoints place it in that block
    node.meta.update({k: v for k, v in first_reader.meta.items() if k in ("nn_module_stack", "stack_trace")})
    if "val" in x.meta:
        node.meta["val"] = x.meta["val"]
    return node


PASS = PassSpec(PASS_NAME, fake_quant_activations, FakeQuantActivationsOptions,
                "input of each quantized decoder linear -> qgraph::fake_quant_act_int8_per_token (8da4w's int8 "
                "per-token activations, for ExecuTorch/XNNPACK)")
