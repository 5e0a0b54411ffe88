"""`transform(..., dtype=)`: train in another floating dtype without losing what the plan quantizes.

The model is captured from a cast copy (as `model.to(dtype)` would cast it: every floating parameter and
buffer), so the graph computes in `dtype` from the embedding to the head, with the casts the model's own code
makes (norms and softmax upcast in fp32) traced as they run. The quantizing passes, though, read each weight at
the precision it had before the cast (`PassContext.sources`): a linear the plan quantizes is quantized from
its original float32 weight, and only what the plan leaves in floating point is cast.

The user's model is not changed: the copy has its own module tree and tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from qgraph.capture import structural_copy
from qgraph.errors import QGraphError

TRAINING_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class CastModel:
    """A copy of a model with its floating tensors cast, and the tensors they were cast from, by qualified name
    (every name a tied tensor has). CastModel(model): the model itself, nothing cast."""

    model: nn.Module
    sources: dict[str, Tensor] = field(default_factory=dict)


def check_dtype(dtype: object) -> None:
    """Refuse anything but a floating dtype qgraph trains in."""
    if dtype is None or dtype in TRAINING_DTYPES:
        return
    names = ", ".join(str(d) for d in TRAINING_DTYPES)
    if isinstance(dtype, str):
        hint = f"; pass the torch dtype (torch.{dtype}), not its name" if hasattr(torch, dtype) else ""
        raise TypeError(f"dtype must be a torch.dtype, got the string {dtype!r}{hint}. One of: {names}")
    raise QGraphError(f"dtype={dtype} is not a dtype qgraph trains in; choose one of {names} "
                      "(the plan decides what is quantized; dtype casts the rest)")


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (oneDNN's bf16 path: AVX512-BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def slow_dtype_warning(dtype: torch.dtype | None, model: nn.Module) -> str | None:
    """Why training a CPU model in `dtype` will be slower than in float32 on this machine, or None.

    Without bf16 units torch falls back to a plain loop for bf16 matmuls: measured on a 2-core AMD EPYC (AVX2),
    256 x 576 @ 576 x 1536 took 45 ms in bf16 against 4 ms in float32, and an lrqat-w4 step on SmolLM2 ~15x
    longer. The result is still right, so this is a warning, not an error."""
    on_cpu = all(t.device.type == "cpu" for t in model.parameters())
    if dtype != torch.bfloat16 or not on_cpu or cpu_has_bf16_matmul():
        return None
    return ("dtype=torch.bfloat16 on a CPU without bf16 matrix units (oneDNN reports no bf16 support: no "
            "AVX512-BF16 or AMX): bf16 matmuls fall back to a slow loop here, ~10x slower than float32. "
            "Train in float32 (dtype=None) on this machine, or in bf16 on one with AVX512-BF16/AMX or a GPU")


def cast_copy(model: nn.Module, dtype: torch.dtype) -> CastModel:
    """The model with every floating parameter and buffer in `dtype` (tied tensors stay tied), the
    originals kept by name for the passes that quantize. Tensors already in `dtype` are shared, not copied."""
    copy = structural_copy(model)
    cast: dict[int, Tensor] = {}  # original tensor id -> its cast, once per tensor
    sources: dict[str, Tensor] = {}
    for module_name, module in copy.named_modules(remove_duplicate=False):
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is None or not tensor.is_floating_point() or tensor.dtype == dtype:
                    continue
                if id(tensor) not in cast:
                    cast[id(tensor)] = _cast(tensor, dtype)
                store[name] = cast[id(tensor)]
                sources[f"{module_name}.{name}" if module_name else name] = tensor
    return CastModel(copy, sources)


def _cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    data = tensor.detach().to(dtype)
    return nn.Parameter(data, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else data


def cast_summary(cast: CastModel, dtype: torch.dtype, gm: nn.Module) -> str:
    """The report's line: how many tensors the graph holds cast, and how many the passes quantized instead."""
    held = {name for name, _ in gm.named_parameters(remove_duplicate=False)} | {
        name for name, _ in gm.named_buffers(remove_duplicate=False)}
    kept = sum(name in held for name in cast.sources)
    was = ", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in cast.sources.values()}))
    return (f"dtype {str(dtype).removeprefix('torch.')}: {kept} tensors cast from {was}; "
            f"{len(cast.sources) - kept} quantized from their {was} weights instead")
