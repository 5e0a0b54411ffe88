"""Uniform symmetric integer quantization: the signed grid, per-channel / per-group scales, their init.

A weight W (out x in) is quantized with one scale per output channel, or per group of g consecutive
input columns; scales have shape (out, n_groups), n_groups = in / g (1 for per-channel). The zero
point is 0 and the grid is [qmin, qmax] = [-2^(b-1), 2^(b-1) - 1].
"""

from __future__ import annotations

import torch
from torch import Tensor

from qgraph.errors import unknown_name_message

MIN_BITS, MAX_BITS = 2, 8
SCALE_INIT_METHODS = ("lp", "mse", "minmax")
# Elements of one (candidates x weight) error tensor in the range search: bounds its memory (~16 MB
# in float32) whatever the layer size, while keeping each chunk large enough to vectorise well.
_SEARCH_CHUNK_ELEMENTS = 1 << 22


def grid_bounds(bits: int) -> tuple[int, int]:
    """(qmin, qmax) of the signed `bits`-bit grid."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    half = 1 << (bits - 1)
    return -half, half - 1


def resolve_group_size(in_features: int, group_size: int | None) -> int:
    """Input columns sharing one scale; None or <= 0 means the whole row (per-channel)."""
    if group_size is None or group_size <= 0:
        return in_features
    if in_features % group_size:
        divisors = [d for d in range(1, in_features + 1) if in_features % d == 0]
        below = max(d for d in divisors if d < group_size)
        above = min((d for d in divisors if d > group_size), default=None)
        nearest = f"{below} or {above}" if above is not None else f"{below}"
        raise ValueError(
            f"group_size={group_size} does not divide in_features={in_features}; use a group size "
            f"that divides {in_features} (nearest: {nearest}) or group_size=-1 for one scale per "
            f"output channel"
        )
    return group_size


def scale_shape(out_features: int, in_features: int, group_size: int | None) -> tuple[int, int]:
    """(out, n_groups): the shape of the scale for this weight shape and group size."""
    return out_features, in_features // resolve_group_size(in_features, group_size)


def to_groups(w: Tensor, group_size: int | None) -> Tensor:
    """View (out, in) as (out, n_groups, g), so that a (out, n_groups) scale broadcasts over its group."""
    out_features, in_features = w.shape
    g = resolve_group_size(in_features, group_size)
    return w.reshape(out_features, in_features // g, g)


def from_groups(w_groups: Tensor) -> Tensor:
    """Inverse of `to_groups`: (out, n_groups, g) back to (out, in)."""
    return w_groups.reshape(w_groups.shape[0], -1)


def _check_scale(scale: Tensor, w_groups: Tensor) -> None:
    if tuple(scale.shape) != tuple(w_groups.shape[:2]):
        raise ValueError(
            f"scale has shape {tuple(scale.shape)}, expected (out, n_groups) = "
            f"{tuple(w_groups.shape[:2])} for groups of {w_groups.shape[2]} input columns"
        )


def expand_scale(scale: Tensor, in_features: int) -> Tensor:
    """(out, n_groups) -> (out, in): each group's scale repeated over its input columns."""
    n_groups = scale.shape[1]
    if in_features % n_groups:
        raise ValueError(f"{n_groups} scale groups do not split in_features={in_features} evenly")
    return scale.repeat_interleave(in_features // n_groups, dim=1)


def to_grid_units(w: Tensor, scale: Tensor, group_size: int | None) -> Tensor:
    """W / s, each column divided by its group's scale: the weight in units of grid steps."""
    w_groups = to_groups(w, group_size)
    _check_scale(scale, w_groups)
    return from_groups(w_groups / scale.unsqueeze(-1))


def dequantize(w_int: Tensor, scale: Tensor, group_size: int | None) -> Tensor:
    """s * W_int, each column multiplied by its group's scale."""
    w_groups = to_groups(w_int, group_size)
    _check_scale(scale, w_groups)
    return from_groups(w_groups * scale.unsqueeze(-1))


def round_to_grid(w: Tensor, scale: Tensor, bits: int, group_size: int | None) -> Tensor:
    """clamp(round(W / s), qmin, qmax) as floats: round-to-nearest (RTN), ties to even."""
    qmin, qmax = grid_bounds(bits)
    return to_grid_units(w, scale, group_size).round().clamp(qmin, qmax)


def quantize_to_codes(w: Tensor, scale: Tensor, bits: int, group_size: int | None) -> Tensor:
    """The RTN integer codes of W as int8 (every grid with bits <= 8 fits)."""
    return round_to_grid(w, scale, bits, group_size).to(torch.int8)


def fake_quantize(w: Tensor, scale: Tensor, bits: int, group_size: int | None) -> Tensor:
    """s * clamp(round(W / s)): the RTN-quantized weight in floating point."""
    return dequantize(round_to_grid(w, scale, bits, group_size), scale, group_size)


def init_scale(
    weight: Tensor,
    bits: int,
    group_size: int | None,
    method: str = "lp",
    p: float = 4.0,
    n_candidates: int = 100,
) -> Tensor:
    """Initial scale s0 (out, n_groups) of a weight, in its dtype promoted to at least float32.

    "minmax": absmax / qmax, so that no weight is clipped. "lp": per channel / group, the scale among
    `n_candidates` shrinkings (1/n, 2/n, ..., 1) of the min-max one that minimises sum |W - Q(W)|^p.
    "mse": the same with p = 2 (`p` is then ignored).
    """
    if method not in SCALE_INIT_METHODS:
        raise ValueError(unknown_name_message("scale init method", method, SCALE_INIT_METHODS))
    if n_candidates < 1:
        raise ValueError(f"n_candidates must be at least 1, got {n_candidates}")
    qmin, qmax = grid_bounds(bits)
    dtype = torch.promote_types(weight.dtype, torch.float32)
    w_groups = to_groups(weight.detach().to(dtype), group_size)
    absmax = w_groups.abs().amax(dim=-1)
    # An all-zero group is exact under any scale; 1 keeps its scale finite, positive and trainable.
    minmax_scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    if method == "minmax":
        return minmax_scale
    exponent = 2.0 if method == "mse" else p
    return _search_scale(w_groups, minmax_scale, qmin, qmax, exponent, n_candidates)


def _search_scale(
    w_groups: Tensor, max_scale: Tensor, qmin: int, qmax: int, p: float, n_candidates: int
) -> Tensor:
    # Shrinking the min-max scale clips the few largest weights to buy finer steps for all the others;
    # the best trade-off differs between groups, so each group picks its own factor. The factor 1
    # (min-max itself) is a candidate, so the result is never worse than min-max.
    factors = torch.arange(1, n_candidates + 1, dtype=w_groups.dtype, device=w_groups.device)
    factors = factors / n_candidates
    best_scale = max_scale.clone()
    best_error = torch.full_like(max_scale, float("inf"))
    chunk = max(1, _SEARCH_CHUNK_ELEMENTS // max(1, w_groups.numel()))
    for chunk_factors in factors.split(chunk):
        candidates = max_scale * chunk_factors[:, None, None]  # (c, out, n_groups)
        steps = candidates.unsqueeze(-1)
        error = (w_groups / steps).round_().clamp_(qmin, qmax).mul_(steps).sub_(w_groups)
        error = error.abs_().pow_(p).sum(dim=-1)
        chunk_error, index = error.min(dim=0)
        # Strict "<": on ties the smaller factor, found first, is kept.
        better = chunk_error < best_error
        best_error = torch.where(better, chunk_error, best_error)
        best_scale = torch.where(better, candidates.gather(0, index.unsqueeze(0)).squeeze(0), best_scale)
    return best_scale
