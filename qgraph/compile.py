"""torch.compile with inductor and qgraph's decompositions, passed to each compile rather than
registered in inductor's process-wide table (which would change every other compile in the process)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from qgraph.ops.lrqat import inductor_decompositions


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
