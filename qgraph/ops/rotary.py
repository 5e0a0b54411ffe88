"""qgraph::rotary: the QST side network's rotary position embedding, one opaque op under torch.compile.

    y = cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin)      x = cat(x1, x2) on the last axis (head_dim)

Why an op: a side head is narrow (SmolLM2 at r=16: 36 features in 9 heads of 4), and inductor's CPU code
for this rotation's backward, fused with the split of the q/k/v projection, runs 16-lane vectors masked
down to the 4 features of a head: 7.8 ms a block (a quarter of a compiled qst-nf4 step at 2 x 128 tokens,
which made compiled qst-nf4 slower than eager), where this op's forward and backward calls take 0.75 ms a
block together. As an op, inductor calls it as it is and fuses the rest around it.

The backward of a rotation by an angle is the rotation by minus that angle, so the op's backward is the op
with -sin. cos and sin are tables of the positions (no gradient: they are made from integers).

Only compiled code calls the op (qgraph.side_network.rotate): eager runs the plain ops, and torch.export
traces the plain ops too, so exported programs hold no qgraph op for it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def rotary_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The rotation in plain PyTorch: x (..., head_dim), cos and sin broadcasting to (..., head_dim / 2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@torch.library.custom_op("qgraph::rotary", mutates_args=())
def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # contiguous, as the fake says: the products follow a permuted x's layout (q and k are views of the
    # q/k/v projection), and compiled code checks the strides the fake promised
    return rotary_reference(x, cos, sin).contiguous()


@rotary.register_fake
def _rotary_fake(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x's shape (the tables broadcast over the heads), in the dtype the products promote to
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, cos.dtype))


def _setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
    _, cos, sin = inputs
    if cos.requires_grad or sin.requires_grad:
        raise RuntimeError("qgraph::rotary: cos and sin are tables of integer positions and take no gradient; "
                           "call qgraph.ops.rotary.rotary_reference to differentiate through them")
    ctx.save_for_backward(cos, sin)


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
    cos, sin = ctx.saved_tensors
    return rotary(grad, cos, -sin), None, None


rotary.register_autograd(_backward, setup_context=_setup_context)
