"""insert_checkpoints: activation-checkpoint regions at decoder-block boundaries.

Each region (one block, or k consecutive blocks) is outlined into a sub-GraphModule registered on the
graph module and called as `torch.utils.checkpoint.checkpoint(region, *inputs, use_reentrant=False)`:
the forward keeps only the region's inputs, and the backward runs the region again to rebuild its
activations. Under torch.compile dynamo turns the same call into its tagged checkpoint region, so
inductor's partitioner recomputes the region instead of saving it: one rewrite serves eager and
compiled training.

The region takes every tensor it reads as an argument, parameters and buffers included (their
get_attr nodes stay in the outer graph), so no parameter gains a second owner or a second
state_dict key, and the qgraph ops inside (lrqat_linear, nf4_linear) run unchanged.

`save` keeps some outputs instead of recomputing them (selective checkpointing, `qgraph.recompute`):
"attention" the attention kernel's, "residual_linears" those of the linears whose output flows straight
into the residual stream (attention's output projection, the MLP's down projection), found by structure
in each block. The region's call then reads `checkpoint(region, ..., save_attention=True,
save_linears=(3, 6))`.

target="modules" checkpoints whole modules whose path matches `include`, one region each: a call_module
node in the graph becomes `checkpoint(module, *args, use_reentrant=False)`; a module called inside
another module's forward (QST's side blocks, which SideNetwork loops over) gets a forward that goes
through checkpoint. Either way the module keeps its parameters, type and state_dict keys.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from qgraph.graph import (CHECKPOINT, Block, as_patterns, checkpointed_module, decoder_blocks, flat_graph,
                          matches_any)
from qgraph.recompute import is_linear_op
from qgraph.pipeline import PassContext, PassResult, PassSpec, options_dict
from qgraph.report import ADDED, SKIPPED, PassReport, SiteRecord

PASS_NAME = "insert_checkpoints"
TARGETS = ("blocks", "modules")
SAVE_KINDS = ("attention", "residual_linears")
aten = torch.ops.aten
ATTENTION_NODES = (aten.scaled_dot_product_attention.default,)
# nodes that may or may not dispatch to an mm: a region holding one cannot count its linears
AMBIGUOUS_MATMULS = (aten.matmul.default, aten.einsum.default, aten.tensordot.default, aten.bmm.default)
# ops on the way into a residual add that pass a value on as it is (up to a cast, or dropout's scaling)
PASS_THROUGH = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.dropout.default,
                aten.clone.default, aten.contiguous.default, aten.alias.default, aten.to.dtype,
                aten._to_copy.default)
REGION_PREFIX = "checkpoint_region_"  # the outlined regions' attribute names on the graph module
COMPUTE_OPS = ("call_function", "call_method", "call_module")


@dataclass(frozen=True)
class CheckpointOptions:
    # one region per `every` consecutive selected blocks (1: every block is its own region)
    every: int = 1
    # "blocks": the decoder blocks found in the graph; "modules": call_module nodes matching `include`
    target: str = "blocks"
    # module-path globs (`model.layers.*`); None selects every decoder block (target="blocks")
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    # what a block region keeps instead of recomputing: "attention", "residual_linears" (target="blocks")
    save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"every must be a positive integer (blocks per checkpoint region), got {self.every!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        object.__setattr__(self, "include", as_patterns(self.include))
        object.__setattr__(self, "exclude", as_patterns(self.exclude) or ())
        if self.target == "modules" and not self.include:
            raise ValueError("target='modules' needs include globs naming the modules to checkpoint "
                             "(for QST's side blocks: include=('qst_side.blocks.*',))")
        object.__setattr__(self, "save", as_patterns(self.save) or ())
        unknown = [kind for kind in self.save if kind not in SAVE_KINDS]
        if unknown:
            raise ValueError(f"save={list(self.save)}: {unknown[0]!r} is not something a region can keep; choose "
                             f"from {', '.join(SAVE_KINDS)}")
        if self.save and self.target != "blocks":
            raise ValueError(f"save={list(self.save)} applies to decoder-block regions; with target='modules' "
                             "leave it empty")
        if self.target == "modules" and self.every != 1:
            raise ValueError(f"every={self.every} groups decoder blocks; with target='modules' each module is its "
                             "own region: leave every=1")


def insert_checkpoints(gm: fx.GraphModule, context: PassContext, options: CheckpointOptions) -> PassResult:
    report = PassReport(PASS_NAME, options_dict(options))
    if options.target == "modules":
        _checkpoint_modules(gm, options, report)
    else:
        _checkpoint_blocks(gm, options, report)
    if not report.with_action(ADDED):
        # a note: a model without decoder blocks (a plain module) has none to checkpoint; where the user's own
        # globs chose none, transform raises (qgraph.api.check_checkpoint_globs)
        report.notes.append(f"{_nothing_found(options)}; its module paths are e.g. {_example_paths(gm, options)}")
    return PassResult(gm, modified=bool(report.with_action(ADDED)), report=report)


def _nothing_found(options: CheckpointOptions) -> str:
    if options.target == "modules":
        return f"no module matches include={list(options.include)}: no checkpoint regions"
    return "no decoder block selected (none found, or include/exclude matched none): no checkpoint regions"


def _example_paths(gm: fx.GraphModule, options: CheckpointOptions) -> str:
    paths = ([b.path for b in decoder_blocks(gm)] if options.target == "blocks" else
             [path for path, _ in gm.named_modules() if path and not path.startswith("_")])
    return ", ".join(paths[:4]) or "(the graph has none)"


def _selected(path: str, options: CheckpointOptions) -> bool:
    return (options.include is None or matches_any(path, options.include)) and not matches_any(path, options.exclude)


# --- decoder blocks -------------------------------------------------------------------------------------


def group_blocks(blocks: Sequence[Block], every: int) -> list[list[Block]]:
    """Runs of consecutive blocks cut into groups of at most `every`: a region never spans a gap."""
    runs: list[list[Block]] = []
    for block in blocks:
        if runs and runs[-1][-1].index == block.index - 1:
            runs[-1].append(block)
        else:
            runs.append([block])
    return [run[i:i + every] for run in runs for i in range(0, len(run), every)]


def _checkpoint_blocks(gm: fx.GraphModule, options: CheckpointOptions, report: PassReport) -> None:
    blocks = [b for b in decoder_blocks(gm) if _selected(b.path, options)]
    report.matched = len(blocks)
    # Decide every region before outlining any: a region that cannot be outlined is reported, not half-done.
    # (What a region keeps is read off the blocks before outlining too: outlining rewires their inputs.)
    planned = []
    for group in group_blocks(blocks, options.every):
        nodes = _compute_nodes(group)
        planned.append((group, _region_problem(gm, group), nodes, kept_outputs(group, nodes, options.save)))
    for group, problem, nodes, keep in planned:
        name = _region_name(group)
        if problem:
            report.records.append(SiteRecord(name, SKIPPED, reason=problem))
            continue
        region = outline_region(gm, nodes, _free_attr(gm), keep)
        report.records.append(SiteRecord(name, ADDED, params=_param_count(gm, region.inputs),
                                         detail=region.describe(len(group))))
        if "residual_linears" in options.save and keep.ambiguous:
            report.notes.append(f"{name}: {keep.ambiguous} may or may not run as an mm, so the region's linears "
                                "cannot be counted: their outputs are recomputed")


def _compute_nodes(group: Sequence[Block]) -> list[fx.Node]:
    return [n for block in group for n in block.nodes if n.op in COMPUTE_OPS]


def _region_name(group: Sequence[Block]) -> str:
    first, last = group[0].path, group[-1].path
    return first if first == last else f"{first}..{last.rpartition('.')[2]}"


def _region_problem(gm: fx.GraphModule, group: Sequence[Block]) -> str:
    """Why these blocks cannot become one region ('' if they can)."""
    nodes = _compute_nodes(group)
    if any(checkpointed_module(gm, n) is not None for n in nodes):
        return "already checkpointed (insert_checkpoints ran before)"
    modules = [n.target for n in nodes if n.op == "call_module"]
    if modules:
        return (f"the blocks call submodules ({', '.join(map(str, modules[:3]))}); outlining them would give "
                "their parameters a second owner: checkpoint them with target='modules' instead")
    inside = set(nodes)
    escaping = _dependents_between(gm, inside)
    needed_back = [n for n in escaping if any(user in inside for user in n.users)]
    if needed_back:
        return (f"{needed_back[0].name} is computed outside the blocks from their values and read back inside "
                "(the blocks are not one contiguous region); checkpoint them one by one (every=1)")
    return ""


def _dependents_between(gm: fx.GraphModule, inside: set[fx.Node]) -> list[fx.Node]:
    """Nodes outside `inside` but placed among its nodes that depend on one of them.

    They must move after the region's call; if a region node also reads one of them, the region is
    not convex and cannot be outlined."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    first, last = min(order[n] for n in inside), max(order[n] for n in inside)
    tainted: set[fx.Node] = set(inside)
    dependents = []
    for node in gm.graph.nodes:
        if not first < order[node] < last or node in inside:
            continue
        if any(arg in tainted for arg in node.all_input_nodes):
            tainted.add(node)
            dependents.append(node)
    return dependents


# --- what a region keeps -------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeptOutputs:
    """What a region keeps instead of recomputing, as `qgraph.recompute.checkpoint` takes it."""

    attention: bool = False
    linears: tuple[int, ...] = ()  # ordinals among the region's linear ops
    ambiguous: str = ""  # a node that made the linears uncountable

    def kwargs(self) -> dict:
        return {**({"save_attention": True} if self.attention else {}),
                **({"save_linears": self.linears} if self.linears else {})}


def is_linear_node(node: fx.Node) -> bool:
    # a node that runs as exactly one counted linear op when dispatched: aten.linear (as mm/addmm), or
    # one of those ops or a qgraph op itself
    return node.op == "call_function" and (node.target is aten.linear.default or is_linear_op(node.target))


def residual_linears(block: Block) -> set[fx.Node]:
    """The linear nodes whose output is added to the block's residual stream as it is (o_proj, down_proj)."""
    residual = {_source(block.hidden_in)}
    found = set()
    for node in block.nodes:
        if node.target != aten.add.Tensor:
            continue
        sources = [_source(arg) for arg in node.args if isinstance(arg, fx.Node)]
        if any(source in residual for source in sources):
            residual.add(node)
            found.update(source for source in sources if source not in residual and is_linear_node(source))
    return found


def _source(node: fx.Node) -> fx.Node:
    """The node whose value `node` passes on unchanged (through views, casts, dropout)."""
    while node.target in PASS_THROUGH and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def kept_outputs(group: Sequence[Block], nodes: Sequence[fx.Node], save: Sequence[str]) -> KeptOutputs:
    attention = "attention" in save and any(n.target in ATTENTION_NODES for n in nodes)
    if "residual_linears" not in save:
        return KeptOutputs(attention)
    ambiguous = next((n for n in nodes if n.target in AMBIGUOUS_MATMULS), None)
    if ambiguous is not None:
        return KeptOutputs(attention, ambiguous=f"{ambiguous.name} ({ambiguous.target})")
    wanted = set().union(*(residual_linears(block) for block in group))
    linears = [n for n in nodes if is_linear_node(n)]
    return KeptOutputs(attention, tuple(i for i, n in enumerate(linears) if n in wanted))


# --- outlining -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    attr: str
    module: fx.GraphModule
    inputs: tuple[fx.Node, ...]
    outputs: tuple[fx.Node, ...]
    call: fx.Node
    n_ops: int
    keep: KeptOutputs = KeptOutputs()

    def describe(self, n_blocks: int) -> str:
        weights = sum(n.op == "get_attr" for n in self.inputs)
        blocks = f"{n_blocks} block{'s' if n_blocks > 1 else ''}, "
        kept = (["attention"] if self.keep.attention else []) + [f"{len(self.keep.linears)} linear output(s)"] * bool(
            self.keep.linears)
        return (f"{blocks}{self.n_ops} ops -> {self.attr}; keeps {len(self.inputs) - weights} input(s) "
                f"+ {weights} weight(s){''.join(', ' + k for k in kept)}, recomputes the rest")


def _free_attr(gm: fx.GraphModule) -> str:
    i = 0
    while hasattr(gm, f"{REGION_PREFIX}{i}"):
        i += 1
    return f"{REGION_PREFIX}{i}"


def outline_region(gm: fx.GraphModule, nodes: list[fx.Node], attr: str, keep: KeptOutputs = KeptOutputs()) -> Region:
    """Move `nodes` (in graph order) into a sub-GraphModule `gm.<attr>`, called through checkpoint.

    Inputs are every value the nodes read from outside (weights included); outputs every value read
    after them. Nodes placed among them that depend on them move after the call.
    """
    inside = set(nodes)
    moved = _dependents_between(gm, inside)
    inputs = tuple(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside))
    outputs = tuple(n for n in nodes if any(user not in inside for user in n.users))
    region_module = fx.GraphModule(nn.Module(), _region_graph(nodes, inputs, outputs), class_name="CheckpointRegion")
    gm.add_submodule(attr, region_module)

    graph = gm.graph
    with graph.inserting_after(nodes[-1]):
        module_node = graph.get_attr(attr)
    with graph.inserting_after(module_node):
        call = graph.call_function(CHECKPOINT, (module_node, *inputs), {"use_reentrant": False, **keep.kwargs()})
    call.meta["nn_module_stack"] = nodes[0].meta.get("nn_module_stack", {})
    anchor = call
    for i, output in enumerate(outputs):
        if len(outputs) == 1:
            value = call
        else:
            with graph.inserting_after(anchor):
                value = anchor = graph.call_function(operator.getitem, (call, i))
        for user in [u for u in output.users if u not in inside]:
            user.replace_input_with(output, value)
    for node in moved:  # keep their relative order, now after the region's values
        anchor.append(node)
        anchor = node
    for node in reversed(nodes):
        graph.erase_node(node)
    return Region(attr, region_module, inputs, outputs, call, len(nodes), keep)


def _region_graph(nodes: list[fx.Node], inputs: Sequence[fx.Node], outputs: Sequence[fx.Node]) -> fx.Graph:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for value in inputs:
        env[value] = graph.placeholder(value.name)
        if "val" in value.meta:
            env[value].meta["val"] = value.meta["val"]
    for node in nodes:
        env[node] = graph.node_copy(node, lambda arg: env[arg])
    graph.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs))
    return graph


def _param_count(gm: fx.GraphModule, inputs: Sequence[fx.Node]) -> int:
    """Parameters (trainable or not) the region reads, counted once."""
    seen: dict[int, int] = {}
    for node in inputs:
        if node.op == "get_attr":
            owner, _, name = str(node.target).rpartition(".")
            value = getattr(gm.get_submodule(owner) if owner else gm, name)
            if isinstance(value, nn.Parameter):
                seen[id(value)] = value.numel()
    return sum(seen.values())


# --- whole modules (QST side blocks) --------------------------------------------------------------------


class CheckpointedForward:
    """Set as a module's instance `forward`: runs its class's forward through checkpoint.

    For modules called from inside another module's forward (the side blocks SideNetwork loops over),
    which the graph never sees. An instance attribute, so parameters, state_dict keys and the module's
    type stay as they were; `inline_checkpoints` takes it off again."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args, **kwargs):
        forward = type(self.module).forward.__get__(self.module)
        return CHECKPOINT(forward, *args, use_reentrant=False, **kwargs)


def _checkpoint_modules(gm: fx.GraphModule, options: CheckpointOptions, report: PassReport) -> None:
    modules = [(path, m) for path, m in gm.named_modules() if path and _selected(path, options)]
    # a module inside another selected one is already recomputed with it
    modules = [(path, m) for path, m in modules
               if not any(path.startswith(other + ".") for other, _ in modules if other != path)]
    report.matched = len(modules)
    for path, module in modules:
        nodes = list(gm.graph.find_nodes(op="call_module", target=path))
        if "forward" in vars(module) or _checkpointed_call(gm, path):
            report.records.append(SiteRecord(path, SKIPPED, reason="already checkpointed"))
        elif any(node.kwargs for node in nodes):
            report.records.append(SiteRecord(path, SKIPPED, reason=(
                f"the graph calls {path} with keyword arguments; call it positionally to checkpoint it")))
        else:
            for node in nodes:
                _wrap_call_module(gm, node)
            if not nodes:
                module.forward = CheckpointedForward(module)
            where = "graph call" if nodes else "called inside its parent's forward"
            report.records.append(SiteRecord(path, ADDED, params=sum(p.numel() for p in module.parameters()),
                                             detail=f"{type(module).__name__} ({where}) through checkpoint"))


def _checkpointed_call(gm: fx.GraphModule, path: str) -> bool:
    return any(checkpointed_module(gm, n) is not None and n.args[0].target == path
               for n in gm.graph.find_nodes(op="call_function", target=CHECKPOINT))


def _wrap_call_module(gm: fx.GraphModule, node: fx.Node) -> None:
    graph = gm.graph
    with graph.inserting_before(node):
        module_node = graph.get_attr(str(node.target))
        call = graph.call_function(CHECKPOINT, (module_node, *node.args), {"use_reentrant": False})
    call.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "val")})
    node.replace_all_uses_with(call)
    graph.erase_node(node)


# --- undoing it -----------------------------------------------------------------------------------------


def inline_checkpoints(gm: fx.GraphModule) -> int:
    """Undo this pass in place (for deployment, where nothing is recomputed); returns the regions removed."""
    regions = [str(n.args[0].target) for n in gm.graph.nodes if checkpointed_module(gm, n) is not None]
    patched = [m for m in gm.modules() if isinstance(vars(m).get("forward"), CheckpointedForward)]
    for module in patched:
        del module.forward
    if regions:
        gm.graph = flat_graph(gm)
        for attr in regions:
            if isinstance(getattr(gm, attr, None), fx.GraphModule) and attr.startswith(REGION_PREFIX):
                delattr(gm, attr)
        gm.recompile()
    return len(regions) + len(patched)


PASS = PassSpec(PASS_NAME, insert_checkpoints, CheckpointOptions,
                "decoder blocks -> activation-checkpoint regions (non-reentrant; recomputed in backward)")
