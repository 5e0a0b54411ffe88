"""Autocast rules for qgraph's linear ops: mixed precision as torch.autocast gives it to nn.Linear.

Under `torch.autocast(device, dtype=torch.bfloat16)` a model that transform() left in float32 runs each
qgraph linear in the autocast dtype, as torch's own linear would: the activation (and the bias) are cast to
it, the matmul runs in it, and the output comes out in it. What stays float32 is what autocast keeps float32
elsewhere — the residual stream, the norms, the softmax, the loss — and, inside the op, everything on the
weight's side: Phi0 / the codes, A, B and the scale are not cast, because each op rebuilds its weight in at
least float32 (`qgraph.ops.lrqat.weight_dtype`) and casts only the finished integer (or NF4) weight, so the
trained quantities keep float32 master copies and their gradients come out in float32.

torch.library.register_autocast would cast every floating input, the scales and LoRA factors included, to
one dtype fixed at registration; these rules cast the activation alone, to whatever dtype the autocast
region asks for.
"""

from __future__ import annotations

import torch

from qgraph.ops import int4, lrqat, nf4  # noqa: F401  (the ops must exist before their rules)

# op name -> the positions of the arguments cast to the autocast dtype: the activation, and the bias where
# the op adds it without casting (nf4_linear casts its bias to x's dtype itself)
CAST_ARGUMENTS: dict[str, tuple[int, ...]] = {
    "lrqat_linear": (0, 5),
    "int4_linear": (0, 3),
    "nf4_linear": (0,),
}
AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}

_LIBRARY = torch.library.Library("qgraph", "IMPL")


def autocast_arguments(args: tuple, positions: tuple[int, ...], dtype: torch.dtype) -> tuple:
    """`args` with the floating-point tensors at `positions` cast to `dtype` (float64 left alone, as
    autocast leaves it)."""
    def cast(position: int, value):
        eligible = position in positions and isinstance(value, torch.Tensor) and value.is_floating_point() \
            and value.dtype != torch.float64
        return value.to(dtype) if eligible else value

    return tuple(cast(position, value) for position, value in enumerate(args))


def _rule(name: str, device_type: str, key: str):
    op = getattr(torch.ops.qgraph, name).default
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(_keyset, *args):
        cast = autocast_arguments(args, CAST_ARGUMENTS[name], torch.get_autocast_dtype(device_type))
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*cast)

    return kernel


for _name in CAST_ARGUMENTS:
    for _device_type, _key in AUTOCAST_KEYS.items():
        _LIBRARY.impl(_name, _rule(_name, _device_type, _key), _key, with_keyset=True)
