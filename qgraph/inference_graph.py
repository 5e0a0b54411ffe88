"""The generation-only form of a graph: the same nodes, with less Python around each.

A one-token decode step of a small model costs more in Python than in arithmetic. In SmolLM2's decode graph
~1,300 tensor reads each walk a dotted path through `nn.Module.__getattr__`, and each of the 210 linear op calls
passes the dispatcher, torch.library's autograd layer and its output checks before its kernel runs. The
inference form reads every tensor from a plain instance attribute and calls the ops that have a plain kernel
(`qgraph.ops.eager_kernels`) directly. It records no autograd, so it is only run where none is wanted
(`qgraph.generate` runs it in inference mode).

The form is built once per graph and refreshed from its source before each use: tensors and modules are read
from the source graph again, so `qm.to(...)`, a loaded state or training since reach it, as they reach the
source (`qgraph.decode.tie_weights`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from qgraph.graph import copy_graph, get_attr_tensor
from qgraph.ops import eager_kernels


@dataclass(frozen=True)
class InferenceGraph:
    module: fx.GraphModule
    tensors: dict[str, str]  # plain attribute of `module` -> the source's qualified tensor name
    modules: tuple[str, ...]  # the source's submodules the graph calls, under their own names

    def refresh(self, source: fx.GraphModule) -> fx.GraphModule:
        """The module, reading `source`'s tensors and submodules as they are now."""
        for attribute, name in self.tensors.items():
            # object.__setattr__: an nn.Module would register a Parameter, and read it back through __getattr__
            object.__setattr__(self.module, attribute, get_attr_tensor(source, name))
        for name in self.modules:
            self.module.set_submodule(name, source.get_submodule(name), strict=False)
        return self.module


def inference_graph(source: fx.GraphModule) -> InferenceGraph:
    """Build the inference form of `source` (its graph is copied, not changed)."""
    graph = copy_graph(source.graph)
    kernels = eager_kernels()
    tensors: dict[str, str] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            attribute = f"t__{node.name}"  # node names are unique identifiers; dotted paths flattened might clash
            tensors[attribute] = node.target
            node.target = attribute
        elif node.op == "call_function" and node.target in kernels:
            node.target = kernels[node.target]
    modules = tuple(dict.fromkeys(node.target for node in graph.find_nodes(op="call_module")))
    placeholders = {attribute: torch.empty(0) for attribute in tensors}
    root = placeholders | {name: source.get_submodule(name) for name in modules}
    form = InferenceGraph(fx.GraphModule(root, graph, class_name="InferenceGraph"), tensors, modules)
    form.refresh(source)
    return form
