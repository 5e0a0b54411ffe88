"""Activation-checkpoint calls, and what a region keeps instead of recomputing (selective checkpointing).

A checkpoint region recomputes its forward in backward. Some of its ops cost far more to recompute
than their outputs cost to keep: the attention kernel (its output and log-sum-exp are a few MB per
block), and the linears whose outputs flow straight back into the residual stream (attention's output
projection, the MLP's down projection), whose outputs nothing in the recompute needs but their own
backward. `checkpoint(..., save_attention=True, save_linears=(i, ...))` keeps exactly those, through
torch.utils.checkpoint's selective-checkpoint policy; everything else is recomputed as before.

The policy sees ops as they are dispatched, not graph nodes, so it finds the linears to keep by
counting the region's linear ops in order (as torchtitan's selective checkpointing counts matmuls):
each linear site of a region runs as exactly one qgraph op or one aten mm/addmm. The forward and the
recompute dispatch the same ops in the same order, so they count alike; the pass refuses to count
regions with matmuls that may or may not dispatch to an mm (`matmul`, `einsum`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils.checkpoint
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

aten = torch.ops.aten

# the kernels scaled_dot_product_attention dispatches to (its math fallback decomposes: nothing to keep)
ATTENTION_OPS = frozenset({
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
})
ATEN_LINEAR_OPS = frozenset({aten.mm.default, aten.addmm.default})
QGRAPH_NAMESPACE = "qgraph"
LINEAR_OP_SUFFIX = "_linear"  # qgraph::nf4_linear, lrqat_linear, int4_linear


def is_linear_op(func: Any) -> bool:
    """Whether a dispatched op is how some linear site runs: a qgraph linear op, or the mm/addmm of aten.linear.

    Only qgraph's *_linear ops count: the others (an activation fake quant, a scale rounding) run beside a
    linear, and counting them would shift the ordinals save_linears names."""
    if func in ATEN_LINEAR_OPS:
        return True
    return (isinstance(func, torch._ops.OpOverload) and func.namespace == QGRAPH_NAMESPACE
            and func._opname.endswith(LINEAR_OP_SUFFIX))


def selective_contexts(save_attention: bool, save_linears: tuple[int, ...]):
    """torch.utils.checkpoint's context_fn: keep attention outputs and the linear ops at these ordinals.

    Called once per region call; the counts restart with every call, once for the forward and once
    for the recompute."""
    keep = frozenset(save_linears)
    seen = {False: 0, True: 0}

    def policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
        if save_attention and func in ATTENTION_OPS:
            return CheckpointPolicy.MUST_SAVE
        if is_linear_op(func):
            ordinal = seen[ctx.is_recompute]
            seen[ctx.is_recompute] = ordinal + 1
            if ordinal in keep:
                return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def checkpoint(function: Callable, *args: Any, use_reentrant: bool = False, save_attention: bool = False,
               save_linears: Sequence[int] = (), **kwargs: Any) -> Any:
    """torch.utils.checkpoint.checkpoint(function, *args, **kwargs), optionally keeping attention and some
    linears' outputs. What insert_checkpoints' regions are called through: the graph shows what each keeps."""
    if save_attention or save_linears:
        kwargs["context_fn"] = functools.partial(selective_contexts, save_attention, tuple(save_linears))
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=use_reentrant, **kwargs)
