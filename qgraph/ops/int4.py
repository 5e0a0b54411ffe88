"""qgraph::int4_linear, the deployed form of an LR-QAT layer: y = x @ (s * codes)^T + bias.

Codes are b-bit integers, packed two per byte (uint8, `qgraph.quant.downcast.pack_int4`) for b <= 4
and int8 for b > 4. `fold_lrqat_weight` turns a trained lrqat_linear into such codes; both ops end in the
same `scaled_linear`, so the folded layer's output is bitwise equal.
"""

from typing import Optional

import torch
from torch import Tensor

from qgraph.ops.lrqat import input_grad, rebuild_weight, scaled_linear, weight_dtype
from qgraph.quant.downcast import pack_codes, unpack_codes
from qgraph.quant.uniform import grid_bounds, scale_shape


def check_int4_args(
    x: Tensor,
    codes: Tensor,
    scale: Tensor,
    bias: Optional[Tensor],
    bits: int,
    group_size: int,
    in_features: int,
) -> None:
    grid_bounds(bits)
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the layer takes in_features={in_features}")
    out_features = codes.shape[0]
    expected_scale = scale_shape(out_features, in_features, group_size)
    if tuple(scale.shape) != expected_scale:
        raise ValueError(f"scale has shape {tuple(scale.shape)}, expected {expected_scale}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({out_features},)")


def int4_linear_kernel(x: Tensor, codes: Tensor, scale: Tensor, bias: Optional[Tensor], bits: int, group_size: int,
                       in_features: int) -> Tensor:
    """The op's forward as a plain function (what `qgraph.inference_graph` calls without the dispatcher)."""
    check_int4_args(x, codes, scale, bias, bits, group_size, in_features)
    return scaled_linear(x, unpack_codes(codes, bits, in_features), scale, bias, group_size)


@torch.library.custom_op("qgraph::int4_linear", mutates_args=())
def int4_linear(
    x: Tensor,
    codes: Tensor,
    scale: Tensor,
    bias: Optional[Tensor],
    bits: int,
    group_size: int,
    in_features: int,
) -> Tensor:
    """y = x @ (s * codes)^T + bias with b-bit codes; group_size <= 0 means per-channel scales."""
    return int4_linear_kernel(x, codes, scale, bias, bits, group_size, in_features)


@int4_linear.register_fake
def _int4_linear_fake(x, codes, scale, bias, bits, group_size, in_features):
    check_int4_args(x, codes, scale, bias, bits, group_size, in_features)
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


def _setup_context(ctx, inputs, output):
    x, codes, scale, bias, bits, group_size, in_features = inputs
    if ctx.needs_input_grad[2]:
        raise ValueError(
            "int4_linear keeps its codes and scale frozen; train the scale with lrqat_linear before "
            "folding, or pass scale.detach()"
        )
    ctx.save_for_backward(codes, scale)
    ctx.weight_args = (bits, group_size, in_features)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out):
    codes, scale = ctx.saved_tensors
    bits, group_size, in_features = ctx.weight_args
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = input_grad(grad_out, unpack_codes(codes, bits, in_features), scale, group_size)
    if ctx.needs_input_grad[3]:
        grad_bias = grad_out.reshape(-1, codes.shape[0]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, grad_bias, None, None, None


int4_linear.register_autograd(_backward, setup_context=_setup_context)


def fold_lrqat_weight(
    phi0: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: Tensor,
    bits: int,
    group_size: int,
    lora_scale: float,
    phi_format: str,
) -> tuple[Tensor, Tensor]:
    """(codes, scale) for int4_linear: W_int = clamp(round(phi^-1(Phi0) + c A @ B)) packed, s detached."""
    scale = scale.detach()
    w_int = rebuild_weight(phi0, lora_a.detach(), lora_b.detach(), bits, lora_scale, phi_format, weight_dtype(scale))
    return pack_codes(w_int.to(torch.int8), bits), scale
