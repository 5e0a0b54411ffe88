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


def compile_module(module: torch.nn.Module | Callable, **options: Any) -> Callable:
    """`torch.compile(module, **options)` through `inductor_backend`."""
    return torch.compile(module, backend=inductor_backend, **options)
