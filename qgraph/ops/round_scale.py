"""qgraph::round_scale, a trained scale as a narrower float format stores it, with a straight-through gradient.

LR-QAT trains fp32 scales, but GGUF's Q4_0 blocks (like most int4 kernels) store fp16 ones: rounding them at
export moves the deployed model off the trained one. The lrqat pass's `scale_dtype="float16"` puts this op
between each scale parameter and its lrqat_linear, so that

    s_hat = fp16(s)                 (the forward, and the scale fold_lrqat folds)
    dL/ds = dL/ds_hat               (straight through: the lrqat_linear gradient, taken at s_hat)

The fp32 master s keeps accumulating updates far below fp16's resolution (AdamW at lr 1e-5 moves a scale
by ~1e-5 of itself per step, 1/50 of an fp16 step), which rounding the parameter itself would throw away;
s_hat moves once they add up to half a step. The op is as large as the scale (one value per channel or
group): nothing weight-sized is formed or saved.
"""

import torch
from torch import Tensor, fx

# the formats a scale may be rounded to, by the names the lrqat pass's option takes (float32 is the
# identity for the float32 scales LR-QAT trains; float64 lets gradcheck see the true derivative)
ROUNDING_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                   "float64": torch.float64}


def check_round_scale_args(scale: Tensor, dtype: str) -> None:
    if dtype not in ROUNDING_DTYPES:
        raise ValueError(f"round_scale: dtype must be one of {', '.join(ROUNDING_DTYPES)}, got {dtype!r}")
    if not scale.is_floating_point():
        raise ValueError(f"round_scale: the scale must be a floating-point tensor, got {scale.dtype}")


def round_scale_reference(scale: Tensor, dtype: str) -> Tensor:
    """The nearest value of `dtype` (round to nearest even), back in the scale's own dtype."""
    return scale.to(ROUNDING_DTYPES[dtype]).to(scale.dtype, copy=True)


def rounding_deviation(scale: Tensor, dtype: str) -> float:
    """max |dtype(s) - s| / |s| over the nonzero scales: how far a format that stores the scales in `dtype`
    (GGUF: float16, XNNPACK: bfloat16) moves them from the trained ones (0: exact)."""
    nonzero = scale[scale != 0].detach().float()
    if not nonzero.numel():
        return 0.0
    return float(((round_scale_reference(nonzero, dtype) - nonzero).abs() / nonzero.abs()).max())


@torch.library.custom_op("qgraph::round_scale", mutates_args=())
def round_scale(scale: Tensor, dtype: str) -> Tensor:
    """`scale` rounded to the nearest `dtype` value (fp16: "float16"), returned in its own dtype."""
    check_round_scale_args(scale, dtype)
    return round_scale_reference(scale, dtype)


@round_scale.register_fake
def _round_scale_fake(scale, dtype):
    check_round_scale_args(scale, dtype)
    return torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    pass  # the gradient is the incoming one: nothing to keep


def _backward(ctx, grad_out):
    return grad_out, None


round_scale.register_autograd(_backward, setup_context=_setup_context)


def is_round_scale(node: object) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function"
            and node.target == torch.ops.qgraph.round_scale.default)


def scale_source(arg: object) -> object:
    """The node a scale argument reads its value from: the parameter's get_attr under a round_scale
    node, the argument itself otherwise (what code that looks for the scale parameter should inspect)."""
    return arg.args[0] if is_round_scale(arg) else arg
