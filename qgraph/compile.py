"""torch.compile with inductor and qgraph's decompositions, passed to each compile rather than
registered in inductor's process-wide table (which would change every other compile in the process).

A graph whose decoder blocks are checkpoint regions (insert_checkpoints) is compiled region by region:
the regions of one structure (SmolLM2's 30 blocks are one) share one compiled function, traced, lowered
and code-generated once, and the few ops between them (embedding, masks, final norm) run eagerly. Whole-graph
compilation generates the same kernels once per block: on SmolLM2 (lrqat-w4, 2 x 128, inductor's caches off)
its first step took 174 s, region by region 35 s, for a step about 5% slower (README, "Activation
checkpoints and torch.compile").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from qgraph.errors import QGraphError
from qgraph.graph import CHECKPOINT, checkpointed_module, graph_copy
from qgraph.ops.lrqat import inductor_decompositions

# transform(compile=...): True or "regions", checkpoint regions compiled once per structure where they can be;
# "graph", the whole graph at once (a longer first compile, a step about 5% faster on SmolLM2)
COMPILE_MODES = ("regions", "graph")

# Every distinct region structure takes entries in dynamo's cache for CheckpointedRegion.forward (they share
# its code): one for the first region, whose input (the frozen embedding's output) needs no gradient, one for
# the rest, each again per grad mode (training, evaluation). Dynamo's default recompile limit is 8 entries;
# above this many structures the whole graph is compiled instead.
MAX_DISTINCT_REGIONS = 2


def inductor_backend(graph: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    """A torch.compile backend: inductor, with lrqat_linear decomposed so that inductor fuses its
    weight construction (dequantize, add the low-rank product, round, clamp, scale)."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    return compile_fx(graph, example_inputs, decompositions={**select_decomp_table(), **inductor_decompositions()})


def compile_module(module: Callable, *, dynamic: bool | None = None, fullgraph: bool = False) -> Callable:
    """`torch.compile(module, dynamic=..., fullgraph=...)` through `inductor_backend`.

    Not `mode=` or `options=`: torch.compile hands those to a callable backend as keyword arguments,
    which inductor_backend does not take."""
    return torch.compile(module, backend=inductor_backend, dynamic=dynamic, fullgraph=fullgraph)


@dataclass(frozen=True)
class CompiledGraph:
    """What a compiled QGraphModule runs, and how it was compiled (the report's line)."""

    run: Callable
    description: str


def compile_mode(compile: bool | str) -> str | None:
    """transform's `compile` argument as one of COMPILE_MODES, or None for no compile; anything else is refused."""
    if compile is False:
        return None
    if compile is True:
        return "regions"
    if compile in COMPILE_MODES:
        return compile
    raise QGraphError(f"compile must be False, True (= 'regions') or one of {', '.join(map(repr, COMPILE_MODES))} "
                      f"('graph' compiles the whole graph at once), got {compile!r}")


def compile_graph_module(gm: fx.GraphModule, mode: str = "regions") -> CompiledGraph:
    """Compile `gm` for training with dynamic shapes: region by region where its checkpoint regions allow
    it (see the module docstring) and `mode` is "regions", else as one graph. `gm` itself is not changed."""
    calls = region_calls(gm)
    keys = [region_key(gm, call) for call in calls]
    distinct = dict.fromkeys(keys)
    why = "compile='graph'" if mode == "graph" else whole_graph_reason(gm, calls, distinct)
    if not why:
        structures = f"{len(distinct)} structure{'s' if len(distinct) > 1 else ''}"
        return CompiledGraph(compile_regions(gm, calls, keys),
                             f"torch.compile: {len(calls)} checkpoint regions of {structures}, each structure "
                             "compiled once; the graph between them runs eagerly")
    return CompiledGraph(compile_module(gm, dynamic=True), f"torch.compile: the whole graph ({why})")


def whole_graph_reason(gm: fx.GraphModule, calls: list[fx.Node], distinct: dict[tuple | None, None]) -> str:
    """Why `gm` cannot be compiled region by region, or "" when it can."""
    if not calls:
        return "no checkpoint region in the graph itself"
    if None in distinct:
        return "a checkpoint region holds its own tensors (a checkpointed module)"
    if len(distinct) > MAX_DISTINCT_REGIONS:
        return f"{len(distinct)} distinct checkpoint regions (compiled apart above {MAX_DISTINCT_REGIONS})"
    if any(isinstance(value, torch.Tensor) for value in vars(gm).values()) or gm._parameters or gm._buffers:
        # compile_regions shares gm's submodules; a tensor held by gm itself would be a snapshot that a later
        # qm.to(...) does not move
        return "the graph module holds tensors of its own, outside its submodules"
    return ""


def region_calls(gm: fx.GraphModule) -> list[fx.Node]:
    return list(gm.graph.find_nodes(op="call_function", target=CHECKPOINT))


def region_key(gm: fx.GraphModule, call: fx.Node) -> tuple | None:
    """What two checkpoint calls must share to run one compiled function: the region's ops and how they
    connect, and the call's options. None for a region with tensors of its own (a checkpointed module, whose
    weights are not inputs), which cannot stand in for another."""
    region = checkpointed_module(gm, call)
    if not isinstance(region, fx.GraphModule) or any(True for _ in region.parameters()) \
            or any(True for _ in region.buffers()) or region.graph.find_nodes(op="get_attr"):
        return None
    return graph_structure(region.graph), tuple(sorted((k, repr(v)) for k, v in call.kwargs.items()))


def graph_structure(graph: fx.Graph) -> tuple:
    """The graph's nodes as (op, target, args), each argument node named by its position: equal for two
    graphs that compute the same thing whatever their node names."""
    position = {node: i for i, node in enumerate(graph.nodes)}

    def argument(value: Any) -> Any:
        if isinstance(value, fx.Node):
            return ("node", position[value])
        if isinstance(value, (list, tuple)):
            return type(value).__name__, tuple(argument(v) for v in value)
        if isinstance(value, dict):
            return "dict", tuple((k, argument(v)) for k, v in value.items())
        return repr(value)

    return tuple((node.op, "" if node.op == "placeholder" else str(node.target), argument(node.args),
                  argument(node.kwargs)) for node in graph.nodes)


class CheckpointedRegion(nn.Module):
    """`checkpoint(region, *inputs, **options)` as a module: what is compiled once per region structure.
    The region holds no tensors (its weights are inputs), so any region of that structure can stand in."""

    def __init__(self, region: fx.GraphModule, options: dict[str, Any]) -> None:
        super().__init__()
        self.region = region
        self.options = options

    def forward(self, *inputs: Any) -> Any:
        return CHECKPOINT(self.region, *inputs, **self.options)


def compile_regions(gm: fx.GraphModule, calls: list[fx.Node], keys: list[tuple]) -> fx.GraphModule:
    """A GraphModule sharing gm's submodules (and so every tensor of gm, which whole_graph_reason checked),
    whose checkpoint calls go through one compiled CheckpointedRegion per region structure."""
    run = graph_copy(gm)
    # graph_copy made new modules along each path the graph reads; gm's own submodules replace them, so that
    # what later changes gm's tensors (qm.to(...), a load, a buffer swap) changes what run reads
    for name, child in gm.named_children():
        run.add_module(name, child)
    compiled: dict[tuple, str] = {}
    for call, node, key in zip(calls, region_calls(run), keys, strict=True):  # the same calls, in graph order
        if key not in compiled:
            compiled[key] = f"compiled_region_{len(compiled)}"
            region = CheckpointedRegion(checkpointed_module(gm, call), dict(call.kwargs))
            run.add_module(compiled[key], compile_module(region, dynamic=True, fullgraph=True))
        with run.graph.inserting_before(node):
            replacement = run.graph.call_module(compiled[key], tuple(node.args[1:]))
        replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
        run.graph.erase_node(node)
    run.graph.eliminate_dead_code()  # the regions' get_attr nodes
    run.recompile()
    return run
