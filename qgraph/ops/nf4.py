"""`qgraph::nf4_linear`: y = x @ dequant_nf4(W)^T + b over bitsandbytes NF4 storage.

The weight lives as packed 4-bit codes (two per byte) with one absmax per block of `blocksize`
weights; with double quantization the absmaxes are themselves 8-bit codes with an fp32 absmax per
block of `nested_blocksize` and a mean `offset`. The kernel hands this to bitsandbytes (its CUDA
kernels on GPU); `nf4_linear_reference` decodes the same bytes in plain PyTorch for the tests.
The weight is frozen: the op differentiates with respect to x (and bias) only.

Inside `qgraph.ops.fused_inference.fused_inference()` (what `qm.generate` runs under), a call that wants no
gradient runs on the CPU as bitsandbytes' own Linear4bit does in eval mode: its fused 4-bit kernel over a CPU
layout of the weight (activations and absmaxes in bf16), so generation costs what transformers +
bitsandbytes' `generate` costs and gives its logits. Everywhere else the op decodes the weight to float32, bit
for bit as `dequantize_4bit`, which is what training and evaluation see.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

# bitsandbytes warns on import that an optional faster CPU kernel package is absent; the kernels it
# uses instead are exact, so the warning is only noise in every qgraph command
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import bitsandbytes.functional as bnbf  # noqa: E402
import torch
import torch.nn.functional as F
from torch import Tensor

from qgraph.ops.fused_inference import LayoutCache, fused_inference_wanted


@dataclass(frozen=True)
class NF4Weight:
    """The tensors and sizes of one NF4-quantized (out x in) weight."""

    packed: Tensor  # uint8 (out*in/2, 1)
    absmax: Tensor  # fp32 (n_blocks,), or uint8 codes when double-quantized
    code: Tensor  # fp32 (16,): the NF4 levels
    nested_absmax: Tensor | None
    nested_code: Tensor | None
    offset: Tensor | None  # fp32 scalar added back to dequantized absmaxes
    shape: tuple[int, int]
    blocksize: int
    nested_blocksize: int

    def nbytes(self) -> int:
        tensors = (self.packed, self.absmax, self.code, self.nested_absmax, self.nested_code, self.offset)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def quantize_nf4(weight: Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """NF4-quantize a (out x in) weight with bitsandbytes (on the weight's device). A float64 weight is quantized
    from its float32 rounding (bitsandbytes takes 16- and 32-bit floats; NF4's 16 levels do not see the
    difference)."""
    source = weight.detach().to(torch.float32) if weight.dtype == torch.float64 else weight.detach()
    packed, state = bnbf.quantize_4bit(
        source.contiguous(), blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4"
    )
    nested = state.state2 if state.nested else None
    return NF4Weight(
        packed=packed,
        absmax=state.absmax,
        code=state.code,
        nested_absmax=nested.absmax if nested else None,
        nested_code=nested.code if nested else None,
        offset=state.offset.reshape(()) if nested else None,
        shape=(int(weight.shape[0]), int(weight.shape[1])),
        blocksize=blocksize,
        nested_blocksize=nested.blocksize if nested else 0,
    )


def _bnb_state(
    absmax: Tensor, code: Tensor, nested_absmax: Tensor | None, nested_code: Tensor | None,
    offset: Tensor | None, shape: tuple[int, int], blocksize: int, nested_blocksize: int,
) -> bnbf.QuantState:
    nested = None
    if nested_absmax is not None:
        nested = bnbf.QuantState(absmax=nested_absmax, code=nested_code, blocksize=nested_blocksize,
                                 dtype=torch.float32)
    return bnbf.QuantState(
        absmax=absmax, shape=torch.Size(shape), code=code, blocksize=blocksize, quant_type="nf4",
        dtype=torch.float32, offset=offset, state2=nested,
    )


def _float_absmax(absmax: Tensor, nested_absmax: Tensor | None, nested_code: Tensor | None,
                  offset: Tensor | None, nested_blocksize: int) -> Tensor:
    """One fp32 absmax per block, decoding the 8-bit codes of double quantization as bitsandbytes does."""
    if nested_absmax is None:
        return absmax
    decoded = torch.ops.bitsandbytes.dequantize_blockwise(absmax, nested_absmax, nested_code, nested_blocksize,
                                                          torch.float32)
    return decoded + offset


def dequantize_nf4(
    packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Tensor | None, nested_code: Tensor | None,
    offset: Tensor | None, out_features: int, in_features: int, blocksize: int, nested_blocksize: int,
) -> Tensor:
    if packed.device.type == "cpu" and in_features % blocksize:
        # bitsandbytes 0.50's CPU kernel assumes no block straddles two rows and decodes such weights
        # wrongly; the plain decode gives the exact NF4 values (GPU kernels are unaffected)
        return decode_nf4(packed, absmax, code, nested_absmax, nested_code, offset,
                          out_features, in_features, blocksize, nested_blocksize)
    # bitsandbytes' registered ops, not `bnbf.dequantize_4bit`: the same kernels without building two
    # QuantState objects per call, which cost more than the decode in a one-token decode step
    absmax = _float_absmax(absmax, nested_absmax, nested_code, offset, nested_blocksize)
    return torch.ops.bitsandbytes.dequantize_4bit(packed, absmax, blocksize, "nf4", [out_features, in_features],
                                                  torch.float32)


# --- bitsandbytes' CPU inference kernel ---------------------------------------------------------------------


@functools.cache
def cpu_inference_kernel_available() -> bool:
    """bitsandbytes registers its fused CPU kernel only on CPUs with AVX512-BF16."""
    return bnbf.has_avx512bf16() and hasattr(bnbf, "_convert_weight_packed_for_cpu")


def uses_inference_kernel(x: Tensor, bias: Tensor | None, out_features: int, in_features: int,
                          blocksize: int) -> bool:
    """Whether this call runs on bitsandbytes' CPU kernel: `fused_inference_wanted`, a CPU that has the kernel,
    and a weight its layout takes (rows in tiles of 32, no block across rows). Other weights decode to float32
    as in training, which is exact, only slower."""
    return (fused_inference_wanted(x, bias) and out_features % 32 == 0 and in_features % blocksize == 0
            and cpu_inference_kernel_available())


@dataclass(frozen=True)
class _CPULayout:
    packed: Tensor  # uint8 (out, in/2), tiled as the kernel reads it
    absmax: Tensor  # bf16 (in/blocksize, out)
    code: Tensor


# As many bytes again as the packed codes, plus the absmaxes in bf16; making one costs ~4 ms a weight.
# bitsandbytes converts its weight in place instead; here the training graph keeps reading the standard layout.
_CPU_LAYOUTS: LayoutCache[_CPULayout] = LayoutCache()


def _cpu_layout(stored: tuple[Tensor | None, ...], out_features: int, in_features: int, blocksize: int,
                nested_blocksize: int) -> _CPULayout:
    state = _bnb_state(*stored[1:], (out_features, in_features), blocksize, nested_blocksize)
    tiled, state = bnbf._convert_weight_packed_for_cpu(stored[0], state)
    return _CPULayout(tiled, state.absmax, state.code)


def _inference_kernel_linear(x: Tensor, layout: _CPULayout, bias: Tensor | None, out_features: int,
                             in_features: int, blocksize: int) -> Tensor:
    out = torch.ops.bitsandbytes.gemv_4bit(x, layout.packed, [out_features, in_features], layout.absmax,
                                           layout.code, blocksize)
    return out if bias is None else out + bias.to(out.dtype)


def nf4_linear_kernel(
    x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Tensor | None,
    nested_code: Tensor | None, offset: Tensor | None, bias: Tensor | None,
    out_features: int, in_features: int, blocksize: int, nested_blocksize: int,
) -> Tensor:
    """The op's forward as a plain function (what `qgraph.inference_graph` calls without the dispatcher)."""
    stored = (packed, absmax, code, nested_absmax, nested_code, offset)
    if uses_inference_kernel(x, bias, out_features, in_features, blocksize):
        layout = _CPU_LAYOUTS.get(stored, lambda: _cpu_layout(stored, out_features, in_features, blocksize,
                                                              nested_blocksize))
        return _inference_kernel_linear(x, layout, bias, out_features, in_features, blocksize)
    weight = dequantize_nf4(*stored, out_features, in_features, blocksize, nested_blocksize)
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def check_nf4_input(x: Tensor, in_features: int) -> None:
    """x must be floating (an integer x would cast the decoded weight to integers, all zeros, and return them)
    with in_features features."""
    if not x.is_floating_point():
        raise TypeError(f"nf4_linear takes floating-point activations, got {x.dtype}: feed the module the float "
                        "inputs its linears take (x.float())")
    if x.shape[-1] != in_features:
        raise ValueError(f"nf4_linear: x has {x.shape[-1]} features, the layer takes in_features={in_features}")


@torch.library.custom_op("qgraph::nf4_linear", mutates_args=())
def nf4_linear(
    x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Tensor | None,
    nested_code: Tensor | None, offset: Tensor | None, bias: Tensor | None,
    out_features: int, in_features: int, blocksize: int, nested_blocksize: int,
) -> Tensor:
    check_nf4_input(x, in_features)
    return nf4_linear_kernel(x, packed, absmax, code, nested_absmax, nested_code, offset, bias,
                             out_features, in_features, blocksize, nested_blocksize)


@nf4_linear.register_fake
def _(x, packed, absmax, code, nested_absmax, nested_code, offset, bias,
      out_features, in_features, blocksize, nested_blocksize):
    check_nf4_input(x, in_features)
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs, output) -> None:
    x, packed, absmax, code, nested_absmax, nested_code, offset, bias, *sizes = inputs
    # the stored 4-bit tensors are saved, never a dequantized weight: backward decodes again
    ctx.save_for_backward(packed, absmax, code, nested_absmax, nested_code, offset)
    ctx.sizes = sizes
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out: Tensor):
    packed, absmax, code, nested_absmax, nested_code, offset = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        weight = dequantize_nf4(packed, absmax, code, nested_absmax, nested_code, offset, *ctx.sizes)
        grad_x = grad_out @ weight.to(grad_out.dtype)
    if ctx.has_bias and ctx.needs_input_grad[7]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    return grad_x, None, None, None, None, None, None, grad_bias, None, None, None, None


nf4_linear.register_autograd(_backward, setup_context=_setup_context)


# --- plain-PyTorch reference ------------------------------------------------------------------------------


def decode_nf4(
    packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Tensor | None, nested_code: Tensor | None,
    offset: Tensor | None, out_features: int, in_features: int, blocksize: int, nested_blocksize: int,
) -> Tensor:
    """Decode the NF4 bytes without bitsandbytes: high nibble first, one absmax per flat block."""
    flat = packed.flatten()
    codes = torch.stack([flat >> 4, flat & 0x0F], dim=1).flatten().long()
    if nested_absmax is not None:
        nested_block = torch.arange(absmax.numel(), device=absmax.device) // nested_blocksize
        absmax = nested_code[absmax.long()] * nested_absmax[nested_block] + offset
    numel = out_features * in_features
    scale = absmax.repeat_interleave(blocksize)[:numel]
    return (code[codes[:numel]] * scale).reshape(out_features, in_features)


def nf4_linear_reference(x: Tensor, w: NF4Weight, bias: Tensor | None = None) -> Tensor:
    """The op in plain PyTorch, for tests."""
    weight = decode_nf4(w.packed, w.absmax, w.code, w.nested_absmax, w.nested_code, w.offset,
                        *w.shape, w.blocksize, w.nested_blocksize)
    return F.linear(x, weight.to(x.dtype), bias)


def nf4_linear_from(x: Tensor, w: NF4Weight, bias: Tensor | None = None) -> Tensor:
    """Call the op on an `NF4Weight` (what tests and eager users want)."""
    return nf4_linear(x, w.packed, w.absmax, w.code, w.nested_absmax, w.nested_code, w.offset, bias,
                      w.shape[0], w.shape[1], w.blocksize, w.nested_blocksize)
