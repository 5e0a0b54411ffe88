"""qgraph::fake_quant_act_int8_per_token: a linear's input as the int8 dynamic-quantized runtime sees it.

ExecuTorch's XNNPACK kernel for "8da4w" linears (torchao's int8 dynamic activations x int4 weights)
quantizes each token of the activation to int8 on the fly, asymmetrically, with the qparams that torch's
`quantized_decomposed.choose_qparams_per_token_asymmetric` picks, then `quantize_per_token` /
`dequantize_per_token`. This op computes exactly that round trip (same ops, same dtypes, same order: the
qparams in the input's dtype, the quantization in float64), so a plan that trains with it trains the model
the runtime runs. The export target replaces it by those three ops.

Per token (the last axis), with qmin, qmax = -128, 127:
    lo = min(min(x), 0), hi = max(max(x), 0)
    s  = max((hi - lo) / 255, eps_f32)
    zp = round(clamp(qmin - lo/s if (qmin + lo/s) + (qmax + hi/s) > 0 else qmax - hi/s, qmin, qmax))
    q  = clamp(round(x * (1/s) + zp), qmin, qmax)          (float64: s is cast to float64 first)
    y  = ((q - zp) * s) in x's dtype

Gradient: a straight-through estimator, as torchao's QAT fake quantizer (0.18) has it: round passes the
gradient through (`_Round`), the clamp stops it where round(x/s) + zp fell outside [qmin, qmax], and the
qparams are constants (torchao's choose_qparams has no gradient). Since the range always covers the
token's min and max, the mask is all ones but for rounding at the ends; it is kept for exactness.
"""

from __future__ import annotations

import torch
from torch import Tensor

QMIN, QMAX = -128, 127  # int8, as XNNPACK's dynamic quantization uses it
SCALE_EPS = torch.finfo(torch.float32).eps  # the floor quantized_decomposed puts under a token's scale


def per_token_qparams(x: Tensor) -> tuple[Tensor, Tensor]:
    """(scale float64, zero point int64), each (..., 1): choose_qparams_per_token_asymmetric's math."""
    lo = torch.minimum(torch.amin(x, dim=-1, keepdim=True), torch.zeros((), dtype=x.dtype))
    hi = torch.maximum(torch.amax(x, dim=-1, keepdim=True), torch.zeros((), dtype=x.dtype))
    # computed in x's dtype (bf16 activations get bf16 qparams, as the reference computes them)
    scale = ((hi - lo) / float(QMAX - QMIN)).clamp(min=SCALE_EPS)
    lo_units, hi_units = lo / scale, hi / scale
    # the zero point that wastes less of the grid on the side with the smaller rounding error
    zero_point = torch.where((QMIN + lo_units) + (QMAX + hi_units) > 0, QMIN - lo_units, QMAX - hi_units)
    zero_point = zero_point.clamp(QMIN, QMAX).round()
    return scale.to(torch.float64), zero_point.to(torch.int64)


def unclamped_codes(x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """round(x * (1/s) + zp) in float64, before the clamp: quantize_per_token's arithmetic."""
    return x.mul(1.0 / scale).add(zero_point).round()


def fake_quant_per_token_reference(x: Tensor) -> Tensor:
    """The quantize -> dequantize round trip in plain PyTorch (what the op computes)."""
    scale, zero_point = per_token_qparams(x)
    codes = unclamped_codes(x, scale, zero_point).clamp(QMIN, QMAX).to(torch.int8)
    return ((codes - zero_point) * scale).to(x.dtype)


def in_range_mask(x: Tensor) -> Tensor:
    """Where the straight-through gradient passes: the unclamped code lies in [qmin, qmax]."""
    scale, zero_point = per_token_qparams(x)
    codes = unclamped_codes(x, scale, zero_point)
    return (codes >= QMIN) & (codes <= QMAX)


def _check_input(x: Tensor) -> None:
    if not x.is_floating_point():
        raise ValueError(f"fake_quant_act_int8_per_token takes a floating-point activation, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"fake_quant_act_int8_per_token needs a non-empty last (feature) axis, got {tuple(x.shape)}")


@torch.library.custom_op("qgraph::fake_quant_act_int8_per_token", mutates_args=())
def fake_quant_act_int8_per_token(x: Tensor) -> Tensor:
    """x after per-token asymmetric int8 quantization and dequantization (the runtime's activation)."""
    _check_input(x)
    return fake_quant_per_token_reference(x)


@fake_quant_act_int8_per_token.register_fake
def _fake(x: Tensor) -> Tensor:
    _check_input(x)
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output) -> None:
    (x,) = inputs
    # a bool mask (1 byte per element) rather than x: what backward needs, at a quarter of x's size
    ctx.save_for_backward(in_range_mask(x))


def _backward(ctx, grad_out: Tensor) -> Tensor:
    (mask,) = ctx.saved_tensors
    return grad_out * mask


fake_quant_act_int8_per_token.register_autograd(_backward, setup_context=_setup_context)

FAKE_QUANT_ACT = torch.ops.qgraph.fake_quant_act_int8_per_token.default
