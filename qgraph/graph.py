"""Queries over a captured graph: linear sites, decoder blocks, module paths, a networkx view, DOT.

Every query reads `nn_module_stack` metadata (torch.export) or call_module targets (torch.fx), so it
works for any architecture that captures; nothing here knows a model family by name.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import operator
from typing import Any

import networkx as nx
import torch
from torch import fx, nn

from qgraph.inputs import is_int
from qgraph.recompute import checkpoint

aten = torch.ops.aten
# `x @ w` in each form capture leaves it: torch.fx keeps the Python operator, torch.export gives aten.matmul
MATMUL_TARGETS = (operator.matmul, torch.matmul, aten.matmul.default)
# a 2-D weight's transpose as torch.export (`W.T`, `W.t()`) and torch.fx (`torch.t(W)`) record it
TRANSPOSE_TARGETS = (aten.t.default, aten.numpy_T.default, torch.t)
# What counts as a linear site, for messages that say what a pass looked for.
LINEAR_FORMS = ("nn.Linear modules, F.linear / aten.linear, addmm or mm against a 2-D weight attribute (GPT-2's "
                "Conv1D), and x @ W.T / x @ W / torch.matmul against a 2-D weight attribute")


# --- module paths ---------------------------------------------------------------------------------------


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """(module path, module type) pairs from the outermost module to the innermost."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        return [(path, _type_name(kind)) for path, kind in stack.values()]
    if node.op == "call_module":
        return [(str(node.target), "")]
    return []


def module_path(node: fx.Node) -> str:
    """The innermost module that produced `node`, e.g. `model.layers.3.mlp.down_proj` ('' if none)."""
    stack = module_stack(node)
    return stack[-1][0] if stack else ""


def _type_name(kind: object) -> str:
    return kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"


def get_attr_tensor(gm: fx.GraphModule, qualified_name: str) -> torch.Tensor:
    owner, _, attr = qualified_name.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


# --- linear sites ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearSite:
    """One matmul against a weight attribute: `y = x @ W^T + b`, wherever it came from.

    `weight_name` is the qualified attribute in the GraphModule. `transposed` is True where the weight is
    stored (in, out), as in GPT-2's Conv1D (`addmm(bias, x, W)`) or `x @ W`. `weight_view` is the transpose
    node between the attribute and the matmul in `x @ W.T` (None when the matmul reads the attribute).
    """

    node: fx.Node
    path: str
    input: fx.Node
    weight_name: str
    bias_name: str | None
    in_features: int
    out_features: int
    transposed: bool
    weight_view: fx.Node | None = None

    @property
    def kind(self) -> str:
        return "module" if self.node.op == "call_module" else str(self.node.target.__name__).split(".")[0]


def check_graph_module(gm: object, query: str) -> None:
    """The graph queries read an `fx.GraphModule`; a module (the model, what transform returned) is told where
    its graph is instead of failing on a missing `.graph`."""
    if isinstance(gm, fx.GraphModule):
        return
    where = ("qm.graph_module" if isinstance(getattr(gm, "graph_module", None), fx.GraphModule)
             else "qgraph.capture(model)")
    raise TypeError(f"{query} reads a torch.fx.GraphModule; got {type(gm).__name__}: pass {where}")


def linear_sites(gm: fx.GraphModule) -> list[LinearSite]:
    """Every matmul of an activation against a weight attribute, in graph order."""
    check_graph_module(gm, "linear_sites")
    sites = []
    for node in gm.graph.nodes:
        site = _as_linear_site(gm, node)
        if site is not None:
            sites.append(site)
    return sites


def _as_linear_site(gm: fx.GraphModule, node: fx.Node) -> LinearSite | None:
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Linear):
        linear = gm.get_submodule(node.target)
        bias = f"{node.target}.bias" if linear.bias is not None else None
        return LinearSite(node, str(node.target), node.args[0], f"{node.target}.weight", bias,
                          linear.in_features, linear.out_features, transposed=False)
    if node.op != "call_function":
        return None
    weight_view = None
    if node.target == aten.linear.default:
        x, weight, bias = (list(node.args) + [None])[:3]
        transposed = False
    elif node.target == aten.addmm.default:
        bias, x, weight = node.args[:3]
        transposed = True
    elif node.target == aten.mm.default or node.target in MATMUL_TARGETS:
        x, weight = node.args[:2]
        bias, transposed = None, True
        if _transposed_attr(weight) is not None:  # x @ W.T: W is stored (out, in), as nn.Linear stores it
            weight_view, weight, transposed = weight, _transposed_attr(weight), False
    else:
        return None
    if not _is_attr(weight) or (bias is not None and not _is_attr(bias)):
        return None
    shape = get_attr_tensor(gm, weight.target).shape
    if len(shape) != 2:
        return None
    in_features, out_features = (shape[0], shape[1]) if transposed else (shape[1], shape[0])
    return LinearSite(node, module_path(node), x, weight.target, bias.target if bias is not None else None,
                      int(in_features), int(out_features), transposed, weight_view)


def _transposed_attr(node: object) -> fx.Node | None:
    """The attribute node `node` transposes (`W.T`, `W.t()`, `W.transpose(0, 1)`, `aten.t(W)`), else None."""
    if not isinstance(node, fx.Node) or len(node.users) != 1 or not node.args or not _is_attr(node.args[0]):
        return None
    rest = tuple(node.args[1:])
    if node.op == "call_function" and node.target in TRANSPOSE_TARGETS and not rest:
        return node.args[0]
    if node.op == "call_function" and node.target is getattr and rest in (("T",), ("mT",)):
        return node.args[0]
    if node.op == "call_method" and node.target == "t" and not rest:
        return node.args[0]
    is_transpose = ((node.op == "call_method" and node.target == "transpose")
                    or (node.op == "call_function" and node.target in (aten.transpose.int, torch.transpose)))
    if is_transpose and rest in ((0, 1), (1, 0), (-1, -2), (-2, -1)):
        return node.args[0]
    return None


def _is_attr(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def as_patterns(patterns: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """Glob option values as a tuple: one string is one pattern; None stays None (the default). Anything but
    strings is refused (an int would reach fnmatch as a raw TypeError)."""
    if patterns is None or isinstance(patterns, str):
        return patterns if patterns is None else (patterns,)
    globs = tuple(patterns) if isinstance(patterns, Iterable) and not isinstance(patterns, (bytes, Mapping)) else None
    if globs is None or not all(isinstance(p, str) for p in globs):
        raise ValueError(f"module-path globs must be a string or a list of strings (e.g. ['model.layers.*.mlp.*']), "
                         f"got {patterns!r}")
    return globs


def matches_any(path: str, patterns: Sequence[str]) -> bool:
    """Whether a module path matches any of the globs (case-sensitive, as module paths are)."""
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns)


def select_sites(
    sites: Iterable[LinearSite], include: str | Sequence[str], exclude: str | Sequence[str] = ()
) -> list[LinearSite]:
    """Sites whose module path matches any `include` glob and no `exclude` glob (one string is one glob, as in
    the passes' options: iterated, "model.layers.0.*" would be its characters, and "*" matches every path)."""
    include_globs, exclude_globs = as_patterns(include), as_patterns(exclude) or ()
    if include_globs is None:
        raise ValueError("select_sites needs include globs; ['*'] selects every site")
    return [s for s in sites if matches_any(s.path, include_globs) and not matches_any(s.path, exclude_globs)]


# --- decoder blocks -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One repeated decoder block: its module path, its nodes, the hidden state in and out."""

    index: int
    path: str
    nodes: tuple[fx.Node, ...]
    hidden_in: fx.Node
    hidden_out: fx.Node


def decoder_blocks(gm: fx.GraphModule) -> list[Block]:
    """The decoder blocks: children `prefix.<i>` of the module list that holds the most linear sites."""
    check_graph_module(gm, "decoder_blocks")
    members: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        for path, _ in module_stack(node):
            prefix, _, last = path.rpartition(".")
            if last.isdigit() and prefix:
                members.setdefault(path, []).append(node)
                break
    if not members:
        return []
    linear_paths = [s.path for s in linear_sites(gm)]
    containers: dict[str, int] = {}
    for path in members:
        prefix = path.rpartition(".")[0]
        containers[prefix] = containers.get(prefix, 0) + sum(p.startswith(path + ".") for p in linear_paths)
    container = max(containers, key=containers.get)
    paths = sorted((p for p in members if p.rpartition(".")[0] == container), key=lambda p: int(p.rpartition(".")[2]))
    return [_block(i, path, members[path]) for i, path in enumerate(paths)]


def _block(index: int, path: str, nodes: list[fx.Node]) -> Block:
    inside = set(nodes)
    out = [n for n in nodes if any(user not in inside for user in n.users)]
    hidden_out = out[-1]
    hidden_in = _matching_input(nodes, inside, hidden_out)
    return Block(index, path, tuple(nodes), hidden_in, hidden_out)


def _matching_input(nodes: list[fx.Node], inside: set[fx.Node], hidden_out: fx.Node) -> fx.Node:
    """The block's input that has the shape of its output: the residual stream coming in."""
    want = _shape(hidden_out)
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in inside and arg.op != "get_attr" and _shape(arg) == want:
                return arg
    raise ValueError(f"no input of the block producing {hidden_out.name} has its output's shape {want}")


def _shape(node: fx.Node) -> tuple | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def block_sites(gm: fx.GraphModule) -> list[LinearSite]:
    """Linear sites inside decoder blocks (the default target of the quantization passes)."""
    paths = tuple(block.path + "." for block in decoder_blocks(gm))
    return [site for site in linear_sites(gm) if paths and site.path.startswith(paths)]


# --- networkx view and DOT -------------------------------------------------------------------------------


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """The data-flow graph: one node per fx node (op, target, module path), one edge per use."""
    check_graph_module(gm, "to_networkx")
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        graph.add_node(node.name, op=node.op, target=_target_name(node), path=module_path(node))
        for arg in node.all_input_nodes:
            graph.add_edge(arg.name, node.name)
    return graph


def module_graph(gm: fx.GraphModule, depth: int = 4) -> nx.DiGraph:
    """The data flow between modules, paths cut to `depth` components: a picture small enough to read."""
    full = to_networkx(gm)
    graph = nx.DiGraph()

    def group(name: str) -> str:
        attrs = full.nodes[name]
        if attrs["op"] in ("placeholder", "output"):
            return attrs["op"] + ":" + name
        path = ".".join(attrs["path"].split(".")[:depth]) or "<root>"
        return path

    for name, attrs in full.nodes(data=True):
        key = group(name)
        if attrs["op"] == "get_attr":
            continue
        if key not in graph:
            graph.add_node(key, ops={})
        ops = graph.nodes[key]["ops"]
        ops[attrs["target"]] = ops.get(attrs["target"], 0) + 1
    for src, dst in full.edges:
        if full.nodes[src]["op"] == "get_attr":
            continue
        a, b = group(src), group(dst)
        if a != b:
            graph.add_edge(a, b)
    return graph


QGRAPH_COLOR, LINEAR_COLOR, OTHER_COLOR = "#f4a261", "#8ecae6", "#eeeeee"


def to_dot(gm: fx.GraphModule, *, depth: int | None = 4) -> str:
    """DOT text. depth=None draws every node; an int draws the module graph at that depth.

    qgraph ops are orange and plain linears blue, so a rewrite shows at a glance.
    """
    check_graph_module(gm, "to_dot")
    if depth is not None and (not is_int(depth) or depth < 1):
        raise ValueError(f"to_dot's depth is an int >= 1 (module paths cut to that many parts) or None (every "
                         f"node), got {depth!r}")
    lines = ["digraph qgraph {", '  rankdir=TB; node [shape=box, style="rounded,filled", fontname="Helvetica"];']
    if depth is None:
        graph = to_networkx(gm)
        for name, attrs in graph.nodes(data=True):
            color = _color(attrs["target"])
            label = f"{name}\\n{attrs['target']}" + (f"\\n{attrs['path']}" if attrs["path"] else "")
            lines.append(f'  "{name}" [label="{label}", fillcolor="{color}"];')
    else:
        graph = module_graph(gm, depth)
        for name, attrs in graph.nodes(data=True):
            ops = attrs.get("ops", {})
            color = next((_color(t) for t in ops if _color(t) == QGRAPH_COLOR), None) or (
                LINEAR_COLOR if any(_color(t) == LINEAR_COLOR for t in ops) else OTHER_COLOR)
            top = ", ".join(f"{t} x{c}" for t, c in sorted(ops.items(), key=lambda kv: -kv[1])[:3])
            lines.append(f'  "{name}" [label="{name}\\n{top}", fillcolor="{color}"];')
    lines += [f'  "{a}" -> "{b}";' for a, b in graph.edges]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _target_name(node: fx.Node) -> str:
    """`aten.linear`, `qgraph.nf4_linear`, `getitem`, or the module/attribute name."""
    if node.op != "call_function":
        return str(node.target)
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target.overloadpacket._qualified_op_name.replace("::", ".")
    return getattr(node.target, "__name__", str(node.target))


def _color(target: str) -> str:
    if target.startswith("qgraph."):
        return QGRAPH_COLOR
    if target in ("aten.linear", "aten.addmm", "aten.mm") or target.endswith("Linear"):
        return LINEAR_COLOR
    return OTHER_COLOR


def count_ops(gm: fx.GraphModule) -> dict[object, int]:
    """Node count per op (`torch.ops.qgraph.nf4_linear`, overloads merged): what structure tests compare.

    Ops inside checkpoint regions count too: a region changes when values are kept, not what runs."""
    check_graph_module(gm, "count_ops")
    counts: dict[object, int] = {}
    for node in flat_graph(gm).nodes:
        if node.op == "call_function":
            op = node.target.overloadpacket if isinstance(node.target, torch._ops.OpOverload) else node.target
            counts[op] = counts.get(op, 0) + 1
    return counts


# --- checkpoint regions (insert_checkpoints) -------------------------------------------------------------

CHECKPOINT = checkpoint  # qgraph.recompute.checkpoint: torch.utils.checkpoint's, with what a region keeps


def checkpointed_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module `node` runs through torch.utils.checkpoint (an outlined region or a whole module), else None."""
    if node.op != "call_function" or node.target is not CHECKPOINT or not node.args:
        return None
    callee = node.args[0]
    if not isinstance(callee, fx.Node) or callee.op != "get_attr":
        return None
    value = get_attr_tensor(gm, str(callee.target))
    return value if isinstance(value, nn.Module) else None


def flat_graph(gm: fx.GraphModule) -> fx.Graph:
    """`gm`'s graph with every checkpoint region inlined: the whole program as one graph.

    What queries read (count_ops, optimizer groups, folding): nodes are copies, and their get_attr
    targets name `gm`'s own tensors, so `get_attr_tensor(gm, node.target)` reads the real ones. A
    module checkpointed whole comes back as the call_module it was.
    """
    graph = fx.Graph(tracer_cls=gm.graph._tracer_cls)
    graph._codegen = gm.graph._codegen  # the exported module's pytree calling convention
    graph.output(_inline(graph, gm, gm.graph, {}))
    return graph


def _inline(dest: fx.Graph, gm: fx.GraphModule, graph: fx.Graph, env: dict[fx.Node, Any]) -> Any:
    """Copy `graph`'s nodes into `dest` (its placeholders already in `env` are inputs); return its output."""
    for node in graph.nodes:
        if node in env:
            continue
        if node.op == "output":
            return fx.map_arg(node.args[0], lambda arg: env[arg])
        callee = checkpointed_module(gm, node)
        if node.op == "get_attr" and node.users and all(checkpointed_module(gm, u) is not None and u.args[0] is node
                                                          for u in node.users):
            continue  # the region object itself: gone once its body is inlined
        if isinstance(callee, fx.GraphModule):
            args = [fx.map_arg(a, lambda arg: env[arg]) for a in node.args[1:]]
            placeholders = [n for n in callee.graph.nodes if n.op == "placeholder"]
            env[node] = _inline(dest, gm, callee.graph, dict(zip(placeholders, args, strict=True)))
        elif callee is not None:
            env[node] = dest.call_module(str(node.args[0].target), fx.map_arg(node.args[1:], lambda arg: env[arg]))
            env[node].meta = dict(node.meta)
        elif node.target is operator.getitem and isinstance(env.get(node.args[0]), tuple):
            env[node] = env[node.args[0]][node.args[1]]  # an output of an inlined region
        else:
            env[node] = dest.node_copy(node, lambda arg: env[arg])
    raise ValueError("graph has no output node")


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of `graph`'s nodes, with its output type and calling convention."""
    copied = fx.Graph()
    output_value, old_output = copied.graph_copy(graph, {}, return_output_node=True)
    copied.output(output_value, type_expr=old_output.type)
    # the unlifted module's pytree calling convention, shared (deepcopy would copy it to no purpose)
    copied.set_codegen(graph._codegen)
    return copied


def graph_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of `gm`'s graph and the same tensors and submodules (new containers for
    them), so that a pass can rewrite it without touching `gm`."""
    # GraphModule(root, graph) takes the attributes and submodules the graph reads from root, by reference
    copied = fx.GraphModule(gm, copy_graph(gm.graph), class_name=type(gm).__name__)
    copied.meta.update(gm.meta)
    return copied
