"""qgraph::lrqat_linear, the LR-QAT linear (Bondarenko et al. 2024): a low-rank update inside the quantizer.

    Z     = phi^-1(Phi0) + c * A @ B                 (c = alpha / r; Phi0 = phi(W0 / s0) frozen)
    W_int = clamp(round_ste(Z), qmin, qmax)
    y     = x @ (s * W_int)^T + bias

Nothing weight-sized is kept for backward: the weight is rebuilt there from Phi0, A, B and s, which is
most of the memory LR-QAT saves over full-model QAT.

How it is computed, and why:
- The weight is rebuilt in three passes over it: one addmm forms Z (the fixed-point format's power-of-two
  factor and c ride in its beta and alpha, both exact scalings when powers of two), then round and clamp
  in place.
- One scale per output channel is applied to the output, (x @ W_int^T) * s, as integer kernels do,
  instead of to the weight: the same product, without a pass over the weight.
- The backward never forms the dense weight gradient G = dL/dW_hat (a matmul as large as the forward's)
  when it runs eagerly with one scale per output channel. With g = dL/dy:
      dA = c s * (g^T (x B^T)) - S B^T,   dB = c (g (s * A))^T x - A^T S,   ds = sum_tokens g * u,
  where S is c s G on the entries the clamp saturated (M = 0), formed only for the rows that have any
  (none at step 0, few later) from those columns of g, and u = x @ W_int^T is read off the saved output,
  u = (y - bias) / s. Scales per group need G itself for ds; the saturated rows are then taken from it.
  The backward is an op of its own (qgraph::lrqat_linear_backward), so compiled graphs call it as it is.

Dtypes: Z, W_int and s * W_int are computed in the scale's dtype promoted to at least float32
(`weight_dtype`), so that phi^-1(Phi0) + c * A @ B keeps its fractional bits for bf16 activations;
the integer weight is then cast to x's dtype (exactly: it holds small integers) for the matmul. The
weight-side gradients come out in that same rebuild dtype. With 16-bit activations and per-channel scales,
the rank-r products of the backward run in 16 bits on the activations as they come (16-bit matmuls
accumulate in float32, and so do ds's sums over tokens) rather than on float32 copies of them.
"""

from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from qgraph.quant.downcast import check_phi_format, downcast, upcast, upcast_unscaled
from qgraph.quant.uniform import (
    dequantize,
    from_groups,
    grid_bounds,
    scale_shape,
    to_grid_units,
    to_groups,
)

RoundFn = Callable[[Tensor], Tensor]
NeedsGrad = tuple[bool, bool, bool, bool, bool]  # x, A, B, s, bias


def weight_dtype(scale: Tensor) -> torch.dtype:
    """The dtype the weight is rebuilt in: the scale's, promoted to at least float32."""
    return torch.promote_types(scale.dtype, torch.float32)


def is_per_channel(scale: Tensor) -> bool:
    return scale.shape[1] == 1


def phi0_from_weight(
    weight: Tensor, scale0: Tensor, bits: int, group_size: int, phi_format: str
) -> Tensor:
    """Phi0 = phi(W0 / s0): what a layer stores in place of its pretrained weight."""
    return downcast(to_grid_units(weight.detach(), scale0.detach(), group_size), phi_format, bits)


# --- the weight --------------------------------------------------------------------------------------------


def rounded_grid_values(
    phi0: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    bits: int,
    lora_scale: float,
    phi_format: str,
    dtype: torch.dtype,
    round_fn: RoundFn = torch.round,
) -> Tensor:
    """round(Z), Z = phi^-1(Phi0) + c * A @ B, as a new tensor in `dtype` that callers may modify in place.

    `round_fn` exists for the tests: the identity turns the straight-through gradient into the true
    derivative, which gradcheck can then verify.
    """
    values, factor = upcast_unscaled(phi0, phi_format, bits, lora_b.shape[1], dtype)
    a, b = lora_a.to(dtype), lora_b.to(dtype)
    # in place into the upcast copy when there is one: a weight-sized allocation fewer (on CPU, each new
    # large tensor costs page faults)
    z = torch.addmm(values, a, b, beta=factor, alpha=lora_scale) if values is phi0 else \
        values.addmm_(a, b, beta=factor, alpha=lora_scale)
    return z.round_() if round_fn is torch.round else round_fn(z)


def rebuild_weight(
    phi0: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    bits: int,
    lora_scale: float,
    phi_format: str,
    dtype: torch.dtype,
    round_fn: RoundFn = torch.round,
) -> Tensor:
    """W_int = clamp(round(Z), qmin, qmax) in `dtype`."""
    qmin, qmax = grid_bounds(bits)
    return rounded_grid_values(phi0, lora_a, lora_b, bits, lora_scale, phi_format, dtype, round_fn).clamp_(qmin, qmax)


def in_range_mask(z_rounded: Tensor, bits: int) -> Tensor:
    """M: where round(Z) lies inside [qmin, qmax], i.e. where the clamp passes the gradient through."""
    qmin, qmax = grid_bounds(bits)
    return (z_rounded >= qmin) & (z_rounded <= qmax)


def rebuild_weight_and_saturated_rows(
    phi0: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    bits: int,
    lora_scale: float,
    phi_format: str,
    dtype: torch.dtype,
    round_fn: RoundFn = torch.round,
) -> tuple[Tensor, Tensor, Tensor]:
    """(W_int, rows, M_rows): the indices of the rows where round(Z) left the grid somewhere, and the
    in-range mask of those rows only (len(rows) x in). One reduction finds them, so a layer whose clamp
    saturates nowhere (every layer at step 0) pays no weight-sized mask."""
    qmin, qmax = grid_bounds(bits)
    z = rounded_grid_values(phi0, lora_a, lora_b, bits, lora_scale, phi_format, dtype, round_fn)
    # two reductions: on CPU they vectorise where torch.aminmax(dim=1) does not (6x slower here)
    rows = ((z.amin(1) < qmin) | (z.amax(1) > qmax)).nonzero().squeeze(1)
    in_range_rows = in_range_mask(z.index_select(0, rows), bits)
    return z.clamp_(qmin, qmax), rows, in_range_rows


def dequantized_weight(
    w_int: Tensor, scale: Tensor, group_size: int, out_dtype: torch.dtype
) -> Tensor:
    """W_hat = s * W_int, formed in `weight_dtype(scale)` and cast to `out_dtype`."""
    dtype = weight_dtype(scale)
    return dequantize(w_int.to(dtype), scale.to(dtype), group_size).to(out_dtype)


def scaled_linear(
    x: Tensor, w_int: Tensor, scale: Tensor, bias: Optional[Tensor], group_size: int, *, in_place: bool = True
) -> Tensor:
    """y = x @ (s * W_int)^T + bias: the one place an integer weight meets its scale.

    lrqat_linear and int4_linear both end here, so a folded int4 layer reproduces the trained forward
    bit for bit. Per-channel scales multiply the output (x @ W_int^T) * s, sparing a weight-sized pass;
    group scales go into the weight. `in_place=False` does the same float operations out of place, for
    autograd (the reference) and functional graphs (inductor's decomposition).
    """
    if not is_per_channel(scale):
        return F.linear(x, dequantized_weight(w_int, scale, group_size, x.dtype), bias)
    y = F.linear(x, w_int.to(x.dtype))
    if in_place:
        y = y.mul_(scale[:, 0])
        return y if bias is None else y.add_(bias)
    y = (y * scale[:, 0]).to(x.dtype)
    return y if bias is None else y + bias


def input_grad(grad_out: Tensor, w_int: Tensor, scale: Tensor, group_size: int) -> Tensor:
    """dL/dx of `scaled_linear`: (dL/dy * s) @ W_int per channel, dL/dy @ W_hat for groups."""
    if is_per_channel(scale):
        return (grad_out * scale[:, 0]).to(grad_out.dtype) @ w_int.to(grad_out.dtype)
    return grad_out @ dequantized_weight(w_int, scale, group_size, grad_out.dtype)


# --- the op -------------------------------------------------------------------------------------------------


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
    if bias is not None and bias.dtype != x.dtype:
        raise ValueError(f"bias is {bias.dtype} but x is {x.dtype}: cast the bias to the activations' dtype "
                         "(as F.linear requires)")


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
    w_int = rebuild_weight(phi0, lora_a, lora_b, bits, lora_scale, phi_format, weight_dtype(scale), round_fn)
    return scaled_linear(x, w_int, scale, bias, group_size)


def lrqat_linear_backward(
    grad_out: Tensor,
    x: Optional[Tensor],
    output: Optional[Tensor],
    phi0: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: Tensor,
    bias: Optional[Tensor],
    bits: int,
    group_size: int,
    lora_scale: float,
    phi_format: str,
    needs_grad: NeedsGrad,
    round_fn: RoundFn = torch.round,
) -> tuple[Optional[Tensor], ...]:
    """(dx, dA, dB, ds, dbias), each None unless flagged in `needs_grad` (same order).

    With G = dL/dW_hat and M the in-range mask: dZ = s * G * M (straight-through round, zero where
    the clamp saturated), dA = c dZ B^T, dB = c A^T dZ, ds = sum over the group of G * W_int; computed
    without G where the scales allow (see the module docstring). `x` may be None when only dx and dbias
    are asked for; `output` (this op's result, read for per-channel ds) when ds is not.
    """
    needs_x, needs_a, needs_b, needs_scale, needs_bias = needs_grad
    quant = (phi0, lora_a, lora_b, bits, lora_scale, phi_format, weight_dtype(scale), round_fn)
    grad_rows = grad_out.reshape(-1, lora_a.shape[0])
    grad_a = grad_b = grad_scale = None
    if not (needs_a or needs_b or needs_scale):
        w_int = rebuild_weight(*quant)
    elif is_per_channel(scale):
        w_int, rows, in_range_rows = rebuild_weight_and_saturated_rows(*quant)
        grad_a, grad_b, grad_scale = _per_channel_low_rank_grads(
            grad_rows, x, output, w_int, scale, bias, lora_a, lora_b, lora_scale, rows, in_range_rows, needs_grad)
    else:
        w_int, rows, in_range_rows = rebuild_weight_and_saturated_rows(*quant)
        grad_a, grad_b, grad_scale = _grouped_grads(
            grad_rows, x, w_int, scale, group_size, lora_a, lora_b, lora_scale, rows, in_range_rows, needs_grad)
    grad_x = input_grad(grad_out, w_int, scale, group_size) if needs_x else None
    grad_bias = grad_rows.sum(0) if needs_bias else None
    return (grad_x, _cast(grad_a, lora_a), _cast(grad_b, lora_b), _cast(grad_scale, scale), grad_bias)


def _per_channel_low_rank_grads(grad_rows, x, output, w_int, scale, bias, lora_a, lora_b, lora_scale, rows,
                                in_range_rows, needs_grad):
    _, needs_a, needs_b, needs_scale, _ = needs_grad
    dtype = w_int.dtype  # the gradients' dtype: the rebuild's, float32 at least
    # 16-bit activations stay 16-bit: the rank-r products run as 16-bit matmuls (which accumulate in float32)
    # on the gradient and input as they come, instead of on float32 copies of both (tokens x features each)
    compute = grad_rows.dtype if grad_rows.element_size() < 4 else dtype
    s = scale[:, 0].to(dtype)
    grad = grad_rows.to(compute)
    grad_a = grad_b = grad_scale = None
    if needs_a or needs_b:
        x_rows = x.reshape(-1, w_int.shape[1]).to(compute)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        # dZ = c s G M, G = grad^T x: the per-row factor c s scales the rank-r factors, never a (tokens, out)
        # or (out, in) tensor
        row_factor = (lora_scale * s).unsqueeze(1)
        if needs_a:
            grad_a = (grad.T @ (x_rows @ b.to(compute).T)).to(dtype).mul_(row_factor)
        if needs_b:
            grad_b = ((grad @ (a * row_factor).to(compute)).T @ x_rows).to(dtype)
        if rows.numel():
            saturated = (grad.index_select(1, rows).T @ x_rows).to(dtype).masked_fill_(in_range_rows, 0)  # G, M = 0
            _remove_saturated(grad_a, grad_b, saturated.mul_(row_factor.index_select(0, rows)), rows, a, b)
    if needs_scale:
        grad_scale = _per_channel_scale_grad(grad, output, x, w_int, s, bias).unsqueeze(1)
    return grad_a, grad_b, grad_scale


def _per_channel_scale_grad(grad: Tensor, output: Tensor, x: Tensor, w_int: Tensor, s: Tensor,
                            bias: Optional[Tensor]) -> Tensor:
    """ds_i = sum_t grad_ti u_ti, u = x @ W_int^T, read off y = u * s + bias as
    (sum_t grad_ti y_ti - bias_i sum_t grad_ti) / s_i, in s's dtype. The sums over tokens accumulate in
    float32 (at least) whatever the activations' dtype. Rows whose scale is too small to divide by (zero, or
    below the square root of the dtype's tiny) are computed from x instead."""
    dtype = s.dtype
    x_rows = x.reshape(-1, w_int.shape[1])
    if bias is not None and output.element_size() < 4:
        # a 16-bit y = u s + b keeps b's ulp, not u s's: with a large bias, (y - b) / s has lost u's bits
        # (bf16, |b| ~ 300: ds off by 4%), so u is formed again, one matmul the forward's size
        return (grad.to(dtype) * (x_rows.to(dtype) @ w_int.T)).sum(0)
    total = (grad * output.reshape(grad.shape).to(grad.dtype)).sum(0, dtype=dtype)
    if bias is not None:
        total = total - bias.to(dtype) * grad.sum(0, dtype=dtype)
    grad_scale = total / s
    tiny = (s.abs() < torch.finfo(s.dtype).tiny ** 0.5).nonzero().squeeze(1)
    if tiny.numel():
        u = x_rows.to(dtype) @ w_int.index_select(0, tiny).T
        grad_scale[tiny] = (grad.index_select(1, tiny).to(dtype) * u).sum(0)
    return grad_scale


def _grouped_grads(grad_rows, x, w_int, scale, group_size, lora_a, lora_b, lora_scale, rows, in_range_rows,
                   needs_grad):
    _, needs_a, needs_b, needs_scale, _ = needs_grad
    dtype = w_int.dtype
    # ds needs G itself per group; dZ is then c s G, less its saturated entries
    grad_w = grad_rows.T.to(dtype) @ x.reshape(-1, w_int.shape[1]).to(dtype)
    grad_w_groups = to_groups(grad_w, group_size)
    grad_scale = (grad_w_groups * to_groups(w_int, group_size)).sum(-1) if needs_scale else None
    grad_a = grad_b = None
    if needs_a or needs_b:
        # c folded into the (out, n_groups) scale; dZ (before M) formed in place of G
        grad_z = from_groups(grad_w_groups.mul_((lora_scale * scale.to(dtype)).unsqueeze(-1)))
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        grad_a = grad_z @ b.T if needs_a else None
        grad_b = a.T @ grad_z if needs_b else None
        if rows.numel():
            _remove_saturated(grad_a, grad_b, grad_z.index_select(0, rows).masked_fill_(in_range_rows, 0), rows, a, b)
    return grad_a, grad_b, grad_scale


def _remove_saturated(grad_a, grad_b, saturated_grad_z, rows, a, b) -> None:
    """Take out, in place, what the entries with M = 0 added to dA and dB: `saturated_grad_z` is
    c s G on `rows`, zero where M = 1."""
    if grad_a is not None:
        grad_a.index_add_(0, rows, saturated_grad_z @ b.T, alpha=-1)
    if grad_b is not None:
        grad_b.sub_(a.index_select(0, rows).T @ saturated_grad_z)


def _cast(grad: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    return None if grad is None else grad.to(like.dtype)


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


@torch.library.custom_op("qgraph::lrqat_linear_backward", mutates_args=())
def lrqat_linear_backward_op(
    grad_out: Tensor,
    x: Optional[Tensor],
    output: Optional[Tensor],
    phi0: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: Tensor,
    bias: Optional[Tensor],
    bits: int,
    group_size: int,
    lora_scale: float,
    phi_format: str,
    needs_grad: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """lrqat_linear's backward as one op: (dx, dA, dB, ds, dbias), an empty tensor for each one not asked for.

    One op, so that traced and compiled graphs call it as it is: the weight it rebuilds stays inside it
    (a compiler cannot move it into the forward and save it), and so do its data-dependent steps (the
    rows where the clamp saturated)."""
    grads = lrqat_linear_backward(grad_out, x, output, phi0, lora_a, lora_b, scale, bias, bits, group_size,
                                  lora_scale, phi_format, tuple(needs_grad))
    return tuple(grad_out.new_empty(0, dtype=dtype) if g is None else g
                 for g, dtype in zip(grads, _gradient_dtypes(grad_out, lora_a, lora_b, scale), strict=True))


def _gradient_dtypes(grad_out: Tensor, lora_a: Tensor, lora_b: Tensor, scale: Tensor) -> tuple[torch.dtype, ...]:
    """The dtypes of (dx, dA, dB, ds, dbias), asked for or not (an empty tensor's too: fake and real agree)."""
    return (grad_out.dtype, lora_a.dtype, lora_b.dtype, scale.dtype, grad_out.dtype)


@lrqat_linear_backward_op.register_fake
def _lrqat_linear_backward_fake(grad_out, x, output, phi0, lora_a, lora_b, scale, bias, bits, group_size,
                                lora_scale, phi_format, needs_grad):
    shapes = ((*grad_out.shape[:-1], lora_b.shape[1]), lora_a.shape, lora_b.shape, scale.shape, (lora_a.shape[0],))
    return tuple(grad_out.new_empty(shape if needed else (0,), dtype=dtype)
                 for needed, shape, dtype in zip(needs_grad, shapes, _gradient_dtypes(grad_out, lora_a, lora_b, scale),
                                                 strict=True))


def _setup_context(ctx, inputs, output):
    x, phi0, lora_a, lora_b, scale, bias, bits, group_size, lora_scale, phi_format = inputs
    needs = ctx.needs_input_grad
    # x is only needed for the weight side (A, B, s); without it trainable x is not kept alive.
    keep_x = any(needs[2:5])
    # per-channel ds reads u = (y - bias) / s off the output (activation-sized, often kept by its consumer
    # anyway) instead of forming G
    keep_output = needs[4] and is_per_channel(scale)
    ctx.save_for_backward(x if keep_x else None, output if keep_output else None, phi0, lora_a, lora_b, scale,
                          bias if keep_output else None)
    ctx.quant_args = (bits, group_size, lora_scale, phi_format)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out):
    x, output, phi0, lora_a, lora_b, scale, bias = ctx.saved_tensors
    needs = ctx.needs_input_grad
    needs_grad = [needs[0], needs[2], needs[3], needs[4], needs[5]]
    grads = torch.ops.qgraph.lrqat_linear_backward(
        grad_out, x, output, phi0, lora_a, lora_b, scale, bias, *ctx.quant_args, needs_grad)
    grad_x, grad_a, grad_b, grad_scale, grad_bias = (g if needed else None for g, needed in zip(grads, needs_grad))
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
    # packed codes unpacked by shifts, elementwise ops inductor fuses into the weight kernel
    z = upcast(phi0, phi_format, bits, lora_b.shape[1], dtype, table=False) + (lora_scale * lora_a.to(dtype)) @ lora_b.to(dtype)
    return scaled_linear(x, z.round().clamp(qmin, qmax), scale, bias, group_size, in_place=False)


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
    """The same layer in plain differentiable PyTorch (autograd keeps W_hat): what the tests trust.

    Its float operations are the op's (per-channel scales on the output, group scales on the weight),
    so that forwards compare bit for bit; the gradients are autograd's own.
    """
    qmin, qmax = grid_bounds(bits)
    dtype = weight_dtype(scale)
    z = upcast(phi0, phi_format, bits, lora_b.shape[1], dtype) + lora_scale * (
        lora_a.to(dtype) @ lora_b.to(dtype)
    )
    w_ste = (z + (z.round() - z).detach()).clamp(qmin, qmax)
    return scaled_linear(x, w_ste, scale, bias, group_size, in_place=False)
