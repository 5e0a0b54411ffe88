"""Fused CPU kernels for the deployed linears, inside `fused_inference()` only: what `qm.generate` runs under.

At one token a step, decoding a 4-bit weight to float32 costs several times the product itself (a 1536 x 576
weight: ~0.45 ms for NF4, ~0.86 ms for int4, against ~0.08 ms for the float32 product). Fused kernels read the
4-bit codes directly and compute in bf16, as the runtimes people deploy with do:

- `nf4_linear`: bitsandbytes' CPU kernel (AVX512-BF16), the one bitsandbytes' own `Linear4bit` runs in eval
  mode, so generation gives transformers + bitsandbytes' logits bit for bit;
- `int4_linear` (a finalized LR-QAT layer): torch's `_weight_int4pack_mm_for_cpu`, on bf16 activations and
  scales.

Each kernel reads its own layout of the weight, made once per weight and kept beside the stored codes
(`LayoutCache`; remade when a stored tensor changes in place). Outside the context, with a gradient wanted, on
another device or for a weight a kernel's layout cannot take, the ops decode to float32 as training does.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

_ENABLED = contextvars.ContextVar("qgraph_fused_inference", default=False)


@contextlib.contextmanager
def fused_inference(enabled: bool = True) -> Iterator[None]:
    """Within: op calls that want no gradient run on the fused CPU kernels where they apply. enabled=False:
    the float32 decode, as outside."""
    token = _ENABLED.set(enabled)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def fused_inference_wanted(x: Tensor, bias: Tensor | None) -> bool:
    """Inside `fused_inference()`, on the CPU, and no gradient wanted. requires_grad, not grad mode: an op's
    own forward always runs with grad mode off."""
    wants_grad = x.requires_grad or (bias is not None and bias.requires_grad)
    return _ENABLED.get() and not wants_grad and x.device.type == "cpu"


Layout = TypeVar("Layout")


class LayoutCache(Generic[Layout]):
    """A kernel's layout of each weight, keyed by the weight's first stored tensor (held weakly)."""

    def __init__(self) -> None:
        self._layouts: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def get(self, stored: tuple[Tensor | None, ...], make: Callable[[], Layout]) -> Layout:
        # the versions of the stored tensors: a load_state_dict or an in-place edit remakes the layout
        versions = tuple(t._version for t in stored if t is not None)
        entry = self._layouts.get(stored[0])
        if entry is None or entry[0] != versions:
            entry = (versions, make())
            self._layouts[stored[0]] = entry
        return entry[1]
