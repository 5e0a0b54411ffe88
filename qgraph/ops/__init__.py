"""Fused ops under torch.ops.qgraph; importing this package registers them."""

from collections.abc import Callable

import torch

from qgraph.ops import act_quant, autocast, int4, lrqat, nf4, rotary, round_scale  # noqa: F401


def eager_kernels() -> dict[torch._ops.OpOverload, Callable]:
    """The ops whose forward is also a plain function, by overload: a graph that records no autograd can call
    these directly (`qgraph.inference_graph`). The deployed linears: generation runs one per layer a token."""
    return {
        torch.ops.qgraph.nf4_linear.default: nf4.nf4_linear_kernel,
        torch.ops.qgraph.int4_linear.default: int4.int4_linear_kernel,
    }
