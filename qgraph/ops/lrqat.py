"""qgraph::lrqat_linear, the LR-QAT linear (Bondarenko et al. 2024): a low-rank update inside the quantizer.

    Z     = phi^-1(Phi0) + c * A @ B                 (c = alpha / r; Phi0 = phi(W0 / s0) frozen)
    W_int = clamp(round_ste(Z), qmin, qmax)
    y     = x @ (s * W_int)^T + bias

Nothing weight-sized is kept for backward: the weight is rebuilt there from Phi0, A, B and s, which is
most of the memory LR-QAT saves over full-model QAT.

Dtypes: Z, W_int and s * W_int are computed in the scale's dtype promoted to at least float32
(`weight_dtype`), so that phi^-1(Phi0) + c * A @ B keeps its fractional bits for bf16 activations;
the product s * W_int is then cast to x's dtype for the matmul. The weight gradient G is formed in
that same rebuild dtype.
"""

from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from qgraph.quant.downcast import check_phi_format, downcast, upcast
from qgraph.quant.uniform import (
    dequantize,
    from_groups,
    grid_bounds,
    scale_shape,
    to_grid_units,
    to_groups,
)

RoundFn = Callable[[Tensor], Tensor]


def weight_dtype(scale: Tensor) -> torch.dtype:
    """The dtype the weight is rebuilt in: the scale's, promoted to at least float32."""
    return torch.promote_types(scale.dtype, torch.float32)


def phi0_from_weight(
    weight: Tensor, scale0: Tensor, bits: int, group_size: int, phi_format: str
) -> Tensor:
    """Phi0 = phi(W0 / s0): what a layer stores in place of its pretrained weight."""
    return downcast(to_grid_units(weight.detach(), scale0.detach(), group_size), phi_format, bits)


def rebuild_weight(
    phi0: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    bits: int,
    lora_scale: float,
    phi_format: str,
    dtype: torch.dtype,
    round_fn: RoundFn = torch.round,
) -> tuple[Tensor, Tensor]:
    """(W_int, in_range): clamp(round(Z)) in `dtype`, and where round(Z) lay inside [qmin, qmax].

    `round_fn` exists for the tests: the identity turns the straight-through gradient into the true
    derivative, which gradcheck can then verify.
    """
    qmin, qmax = grid_bounds(bits)
    in_features = lora_b.shape[1]
    z = upcast(phi0, phi_format, bits, in_features, dtype) + lora_scale * (
        lora_a.to(dtype) @ lora_b.to(dtype)
    )
    z_rounded = round_fn(z)
    in_range = (z_rounded >= qmin) & (z_rounded <= qmax)
    return z_rounded.clamp(qmin, qmax), in_range


def dequantized_weight(
    w_int: Tensor, scale: Tensor, group_size: int, out_dtype: torch.dtype
) -> Tensor:
    """W_hat = s * W_int, formed in `weight_dtype(scale)` and cast to `out_dtype`.

    The one place the weight meets its scale: lrqat_linear and int4_linear both go through it, so a
    folded int4 layer reproduces the trained forward bit for bit.
    """
    dtype = weight_dtype(scale)
    return dequantize(w_int.to(dtype), scale.to(dtype), group_size).to(out_dtype)


def check_lrqat_args(
    x: Tensor,
    phi0: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: Tensor,
    bias: Optional[Tensor],
    bits: int,
    group_size: int,
    phi_format: str,
) -> None:
    grid_bounds(bits)
    check_phi_format(phi_format)
    out_features, rank = lora_a.shape
    if lora_b.shape[0] != rank:
        raise ValueError(f"lora_a is {tuple(lora_a.shape)} but lora_b is {tuple(lora_b.shape)}: ranks differ")
    in_features = lora_b.shape[1]
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the layer takes in_features={in_features}")
    if phi0.shape[0] != out_features:
        raise ValueError(f"phi0 has {phi0.shape[0]} rows, lora_a has out_features={out_features}")
    expected_scale = scale_shape(out_features, in_features, group_size)
    if tuple(scale.shape) != expected_scale:
        raise ValueError(f"scale has shape {tuple(scale.shape)}, expected {expected_scale}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({out_features},)")


def lrqat_linear_forward(
    x: Tensor,
    phi0: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: Tensor,
    bias: Optional[Tensor],
    bits: int,
    group_size: int,
    lora_scale: float,
    phi_format: str,
    round_fn: RoundFn = torch.round,
) -> Tensor:
    w_int, _ = rebuild_weight(
        phi0, lora_a, lora_b, bits, lora_scale, phi_format, weight_dtype(scale), round_fn
    )
    return F.linear(x, dequantized_weight(w_int, scale, group_size, x.dtype), bias)


def lrqat_linear_backward(
    grad_out: Tensor,
    x: Optional[Tensor],
    phi0: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: Tensor,
    bits: int,
    group_size: int,
    lora_scale: float,
    phi_format: str,
    needs_grad: tuple[bool, bool, bool, bool, bool],
    round_fn: RoundFn = torch.round,
) -> tuple[Optional[Tensor], ...]:
    """(dx, dA, dB, ds, dbias), each None unless flagged in `needs_grad` (same order).

    With G = dL/dW_hat and M the in-range mask: dZ = s * G * M (straight-through round, zero where
    the clamp saturated), dA = c dZ B^T, dB = c A^T dZ, ds = sum over the group of G * W_int.
    `x` may be None when only dx and dbias are asked for.
    """
    needs_x, needs_a, needs_b, needs_scale, needs_bias = needs_grad
    dtype = weight_dtype(scale)
    w_int, in_range = rebuild_weight(
        phi0, lora_a, lora_b, bits, lora_scale, phi_format, dtype, round_fn
    )
    out_features, in_features = w_int.shape
    grad_rows = grad_out.reshape(-1, out_features)
    grad_x = grad_a = grad_b = grad_scale = grad_bias = None
    if needs_x:
        grad_x = grad_out @ dequantized_weight(w_int, scale, group_size, grad_out.dtype)
    if needs_a or needs_b or needs_scale:
        grad_w = grad_rows.T.to(dtype) @ x.reshape(-1, in_features).to(dtype)
        grad_w_groups = to_groups(grad_w, group_size)
        if needs_scale:
            grad_scale = (grad_w_groups * to_groups(w_int, group_size)).sum(-1).to(scale.dtype)
        if needs_a or needs_b:
            # c folded into the (out, n_groups) scale: one small multiply instead of a weight-sized one.
            z_scale = (lora_scale * scale.to(dtype)).unsqueeze(-1)
            grad_z = torch.where(in_range, from_groups(grad_w_groups * z_scale), 0)
            if needs_a:
                grad_a = (grad_z @ lora_b.to(dtype).T).to(lora_a.dtype)
            if needs_b:
                grad_b = (lora_a.to(dtype).T @ grad_z).to(lora_b.dtype)
    if needs_bias:
        grad_bias = grad_rows.sum(0)
    return grad_x, grad_a, grad_b, grad_scale, grad_bias


@torch.library.custom_op("qgraph::lrqat_linear", mutates_args=())
def lrqat_linear(
    x: Tensor,
    phi0: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: Tensor,
    bias: Optional[Tensor],
    bits: int,
    group_size: int,
    lora_scale: float,
    phi_format: str,
) -> Tensor:
    """y = x @ (s * clamp(round(phi^-1(phi0) + lora_scale * A @ B)))^T + bias.

    group_size <= 0 means one scale per output channel; in_features = lora_b.shape[1].
    """
    check_lrqat_args(x, phi0, lora_a, lora_b, scale, bias, bits, group_size, phi_format)
    return lrqat_linear_forward(
        x, phi0, lora_a, lora_b, scale, bias, bits, group_size, lora_scale, phi_format
    )


@lrqat_linear.register_fake
def _lrqat_linear_fake(
    x, phi0, lora_a, lora_b, scale, bias, bits, group_size, lora_scale, phi_format
):
    check_lrqat_args(x, phi0, lora_a, lora_b, scale, bias, bits, group_size, phi_format)
    return x.new_empty((*x.shape[:-1], lora_a.shape[0]))


def _setup_context(ctx, inputs, output):
    x, phi0, lora_a, lora_b, scale, bias, bits, group_size, lora_scale, phi_format = inputs
    # x is only needed for G = dL/dW_hat; without trainable A, B or s it is not kept alive.
    needs_weight_grad = any(ctx.needs_input_grad[2:5])
    ctx.save_for_backward(x if needs_weight_grad else None, phi0, lora_a, lora_b, scale)
    ctx.quant_args = (bits, group_size, lora_scale, phi_format)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out):
    x, phi0, lora_a, lora_b, scale = ctx.saved_tensors
    needs = ctx.needs_input_grad
    needs_grad = (needs[0], needs[2], needs[3], needs[4], needs[5])
    grad_x, grad_a, grad_b, grad_scale, grad_bias = lrqat_linear_backward(
        grad_out, x, phi0, lora_a, lora_b, scale, *ctx.quant_args, needs_grad
    )
    if grad_bias is not None:
        grad_bias = grad_bias.to(ctx.bias_dtype)
    return grad_x, None, grad_a, grad_b, grad_scale, grad_bias, None, None, None, None


lrqat_linear.register_autograd(_backward, setup_context=_setup_context)


def lrqat_linear_compiled(x: Tensor, phi0: Tensor, lora_a: Tensor, lora_b: Tensor, scale: Tensor,
                          bias: Optional[Tensor], bits: int, group_size: int, lora_scale: float,
                          phi_format: str) -> Tensor:
    """lrqat_linear's forward as inductor compiles it: plain ops, which it fuses into one weight kernel
    (dequantize Phi0, add the low-rank product, round, clamp, scale) between two matmuls.

    Used as a decomposition below autograd, so the op's own backward (which rebuilds the weight)
    still applies and nothing weight-sized is saved. Z is formed as phi^-1(Phi0) + (c A) @ B, not as
    the backward forms it, phi^-1(Phi0) + c (A @ B): AOTAutograd merges identical expressions of the
    forward and the backward, and an A @ B shared with the backward would be saved for it (the
    partitioner never recomputes a matmul). Scaling the small A first is exact when c is a power of two
    (alpha 1, rank 32), and otherwise differs from eager by a rounding of c * A.
    """
    qmin, qmax = grid_bounds(bits)
    dtype = weight_dtype(scale)
    z = upcast(phi0, phi_format, bits, lora_b.shape[1], dtype) + (lora_scale * lora_a.to(dtype)) @ lora_b.to(dtype)
    w_int = z.round().clamp(qmin, qmax)
    return F.linear(x, dequantized_weight(w_int, scale, group_size, x.dtype), bias)


def inductor_decompositions() -> dict[torch._ops.OpOverload, Callable[..., Tensor]]:
    """The op -> plain-ops table inductor compiles lrqat_linear with (`qgraph.compile.inductor_backend`
    adds it to inductor's own table for one compile). Eager, torch.export and dynamo's graph keep the
    single op node."""
    return {torch.ops.qgraph.lrqat_linear.default: lrqat_linear_compiled}


def lrqat_linear_reference(
    x: Tensor,
    phi0: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: Tensor,
    bias: Optional[Tensor],
    bits: int,
    group_size: int,
    lora_scale: float,
    phi_format: str,
) -> Tensor:
    """The same layer in plain differentiable PyTorch (autograd keeps W_hat): what the tests trust."""
    qmin, qmax = grid_bounds(bits)
    dtype = weight_dtype(scale)
    z = upcast(phi0, phi_format, bits, lora_b.shape[1], dtype) + lora_scale * (
        lora_a.to(dtype) @ lora_b.to(dtype)
    )
    z_ste = z + (z.round() - z).detach()
    w_hat = dequantize(z_ste.clamp(qmin, qmax), scale.to(dtype), group_size)
    return F.linear(x, w_hat.to(x.dtype), bias)
