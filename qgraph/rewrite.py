"""The one graph surgery every quantization pass does: swap a linear site for a qgraph op."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import fx, nn

from qgraph.graph import LinearSite, get_attr_tensor


def site_weight(gm: fx.GraphModule, site: LinearSite, sources: Mapping[str, torch.Tensor] | None = None
                ) -> torch.Tensor:
    """The site's weight as (out, in), whatever its storage layout; from `sources` (the tensor the graph's was
    cast from, `PassContext.sources`) where it holds the weight's name."""
    weight = (sources or {}).get(site.weight_name)
    weight = (get_attr_tensor(gm, site.weight_name) if weight is None else weight).detach()
    return weight.t() if site.transposed else weight


def site_bias(gm: fx.GraphModule, site: LinearSite) -> torch.Tensor | None:
    return get_attr_tensor(gm, site.bias_name) if site.bias_name else None


def weight_users(gm: fx.GraphModule, weight_name: str) -> list[fx.Node]:
    """Every node that reads `weight_name` (more than one means tied weights)."""
    return [user for node in gm.graph.find_nodes(op="get_attr", target=weight_name) for user in node.users]


def other_readers(gm: fx.GraphModule, site: LinearSite) -> list[fx.Node]:
    """Nodes other than the site itself (and its `W.T` view) that read the site's weight: tied weights."""
    own = {site.node, site.weight_view}
    return [node for node in weight_users(gm, site.weight_name) if node not in own]


def owner_path(site: LinearSite) -> str:
    return site.weight_name.rpartition(".")[0]


def replace_site(
    gm: fx.GraphModule,
    site: LinearSite,
    op: Callable,
    tensors: dict[str, torch.Tensor | nn.Parameter],
    make_args: Callable[[fx.Node, dict[str, fx.Node], fx.Node | None], Sequence],
) -> fx.Node:
    """Register `tensors` on the site's module, call `op(*make_args(x, attrs, bias))` in its place,
    and drop the old weight once nothing reads it.

    Parameters stay parameters (trainable state); other tensors become buffers (frozen state).
    """
    owner_name = owner_path(site)
    owner = gm.get_submodule(owner_name) if owner_name else gm
    names = _attribute_names(owner, site, tensors)
    for name, tensor in tensors.items():
        if isinstance(tensor, nn.Parameter):
            owner.register_parameter(names[name], tensor)
        else:
            owner.register_buffer(names[name], tensor)
    graph = gm.graph
    with graph.inserting_before(site.node):
        attrs = {name: graph.get_attr(f"{owner_name}.{names[name]}" if owner_name else names[name]) for name in tensors}
        bias = graph.get_attr(site.bias_name) if site.bias_name else None
        new = graph.call_function(op, tuple(make_args(site.input, attrs, bias)))
    new.meta.update({k: v for k, v in site.node.meta.items() if k in ("nn_module_stack", "stack_trace", "val")})
    site.node.replace_all_uses_with(new)
    graph.erase_node(site.node)
    if site.weight_view is not None and not site.weight_view.users:
        graph.erase_node(site.weight_view)
    _drop_unused_attr(gm, site.weight_name)
    return new


def _attribute_names(owner: nn.Module, site: LinearSite, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Where each tensor is registered: its own name, or prefixed with the weight's attribute name when the
    module holds several weights (`x @ self.up.T` and `x @ self.down.T` in one module) and the name is taken."""
    weight_attr = site.weight_name.rpartition(".")[2]
    return {name: f"{weight_attr}_{name}" if hasattr(owner, name) else name for name in tensors}


def _drop_unused_attr(gm: fx.GraphModule, qualified_name: str) -> None:
    for node in list(gm.graph.find_nodes(op="get_attr", target=qualified_name)):
        if not node.users:
            gm.graph.erase_node(node)
    if not gm.graph.find_nodes(op="get_attr", target=qualified_name):
        owner, _, attr = qualified_name.rpartition(".")
        delattr(gm.get_submodule(owner) if owner else gm, attr)
