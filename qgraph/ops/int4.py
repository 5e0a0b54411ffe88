"""qgraph::int4_linear, the deployed form of an LR-QAT layer: y = x @ (s * codes)^T + bias.

Codes are b-bit integers, packed two per byte (uint8, `qgraph.quant.downcast.pack_int4`) for b <= 4
and int8 for b > 4. `fold_lrqat_weight` turns a trained lrqat_linear into such codes; both ops end in the
same `scaled_linear`, so the folded layer's output is bitwise equal.

Inside `qgraph.ops.fused_inference.fused_inference()` (generation), a call that wants no gradient runs on torch's
`_weight_int4pack_mm_for_cpu` in bf16 where its layout takes the weight: ~35 us for a 1536 x 576 layer at one
token, against ~0.86 ms to unpack the codes and multiply in float32.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from qgraph.ops.fused_inference import LayoutCache, fused_inference_wanted
from qgraph.ops.lrqat import input_grad, rebuild_weight, scaled_linear, weight_dtype
from qgraph.quant.downcast import PACKED_MAX_BITS, pack_codes, unpack_codes
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


# --- torch's int4 packed matmul, inside fused_inference() ----------------------------------------------------

PACKED_MM_GROUPS = (32, 64, 128, 256)  # the group sizes `_weight_int4pack_mm_for_cpu` takes


def packed_mm_group(codes: Tensor, scale: Tensor, bits: int, in_features: int) -> int | None:
    """The group size torch's packed kernel reads this weight with, or None where it cannot: codes of more than
    4 bits, rows not in tiles of 16, a group it does not take. A per-channel scale is one scale repeated over
    groups of 64 (or 32) columns."""
    if bits > PACKED_MAX_BITS or codes.shape[0] % 16:
        return None
    if scale.shape[1] == 1:
        return next((g for g in (64, 32) if in_features % g == 0), None)
    group = in_features // scale.shape[1]
    return group if group in PACKED_MM_GROUPS and in_features % group == 0 else None


@dataclass(frozen=True)
class _PackedLayout:
    weight: Tensor  # torch's int4pack layout of the codes + 8 (unsigned nibbles)
    scales_and_zeros: Tensor  # bf16 (n_groups, out, 2): scale, and 0 for the zero point (symmetric codes)
    group_size: int


_PACKED_LAYOUTS: LayoutCache[_PackedLayout] = LayoutCache()  # half a byte a weight, as the codes


def _packed_layout(codes: Tensor, scale: Tensor, bits: int, in_features: int, group_size: int) -> _PackedLayout:
    unsigned = unpack_codes(codes, bits, in_features).to(torch.int32) + 8  # (q + 8 - 8) * s + 0 = q * s
    groups = in_features // group_size
    scales = scale.detach().expand(-1, groups) if scale.shape[1] == 1 else scale.detach()
    scales_and_zeros = torch.stack([scales.t(), torch.zeros_like(scales.t())], dim=-1).to(torch.bfloat16)
    return _PackedLayout(torch._convert_weight_to_int4pack_for_cpu(unsigned, 1), scales_and_zeros.contiguous(),
                         group_size)


def _packed_linear(x: Tensor, layout: _PackedLayout, bias: Optional[Tensor]) -> Tensor:
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # the kernel's float32 path is slower than unpacking
    out = torch._weight_int4pack_mm_for_cpu(rows, layout.weight, layout.group_size, layout.scales_and_zeros)
    out = out.to(x.dtype).reshape(*x.shape[:-1], -1)
    return out if bias is None else out + bias.to(out.dtype)


def int4_linear_kernel(x: Tensor, codes: Tensor, scale: Tensor, bias: Optional[Tensor], bits: int, group_size: int,
                       in_features: int) -> Tensor:
    """The op's forward as a plain function (what `qgraph.inference_graph` calls without the dispatcher)."""
    check_int4_args(x, codes, scale, bias, bits, group_size, in_features)
    packed_group = packed_mm_group(codes, scale, bits, in_features) if fused_inference_wanted(x, bias) else None
    if packed_group is not None:
        layout = _PACKED_LAYOUTS.get((codes, scale),
                                     lambda: _packed_layout(codes, scale, bits, in_features, packed_group))
        return _packed_linear(x, layout, bias)
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
