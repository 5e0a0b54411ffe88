"""The causal-LM loss computed in chunks of tokens, fused with the LM head.

A model's logits are (batch, seq, vocab): for SmolLM2 at batch 4 x 256 that is 201 MB in fp32, and
the loss keeps about three such tensors alive around the start of backward (logits, log-softmax,
their gradient). Once the decoder is checkpointed and quantized they are most of the training peak.
`linear_cross_entropy` never holds more than one chunk of logits: it computes each chunk's loss and,
in the same sweep, its gradient with respect to the hidden states (and the head's weight and bias
when they train), so backward only scales what forward stored, (tokens, hidden) in size.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

IGNORE_INDEX = -100  # the label Hugging Face losses skip


@dataclass(frozen=True)
class LMHead:
    """Where the graph's LM head lives once the `chunk_lm_loss` pass moved it out of the graph."""

    weight: str  # qualified attribute name on the graph module
    bias: str | None
    chunk_tokens: int
    delta: str | None = None  # a LowRankHeadDelta's path on the graph module, added to the logits


class LowRankHeadDelta(nn.Module):
    """A trainable low-rank term of a frozen head's logits: `up @ (down @ h)`, (vocab x rank)(rank x width).

    `up` starts at zero, so the head starts as it was. Its parameters stay float32; it computes in float32 and
    returns the input's dtype. `linear_cross_entropy` takes (down, up) and adds the term a chunk at a time,
    so the vocabulary-sized logits are never whole."""

    def __init__(self, width: int, vocab: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, width))
        self.up = nn.Parameter(torch.zeros(vocab, rank))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # nn.Linear's init, as PEFT's LoRA A

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(hidden.to(self.down.dtype), self.down), self.up).to(hidden.dtype)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    chunk_tokens: int = 256,
    num_items_in_batch: torch.Tensor | int | None = None,
    delta: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Hugging Face's causal-LM loss of `hidden @ weight.T + bias` against `labels`, chunked; with `delta`
    (down, up), of those logits plus `(hidden @ down.T) @ up.T` (a LowRankHeadDelta's).

    Token t predicts label t + 1; labels equal to -100 are skipped; the sum is divided by the
    number of counted tokens, or by `num_items_in_batch` when the trainer passes it (gradient
    accumulation), exactly as `transformers.loss.loss_utils.ForCausalLMLoss` does.
    """
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    down, up = delta if delta is not None else (None, None)
    total = _ChunkedLinearCrossEntropy.apply(flat, weight, bias, down, up, shifted, chunk_tokens)
    if num_items_in_batch is None:
        return total / (shifted != IGNORE_INDEX).sum()
    return total / torch.as_tensor(num_items_in_batch, device=total.device)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                   labels: torch.Tensor,
                                   delta: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Plain PyTorch: the whole logits tensor, then cross-entropy (what the tests compare against)."""
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if delta is not None:
        down, up = delta
        logits = logits + F.linear(F.linear(hidden.to(logits.dtype), down.to(logits.dtype)), up.to(logits.dtype))
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=IGNORE_INDEX)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of a linear layer's output (plus a low-rank head delta); gradients computed during
    forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, down, up, targets, chunk_tokens):  # noqa: ANN001 - autograd signature
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        need_delta = down is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # at least float32, as Hugging Face's loss upcasts logits (float64 stays float64)
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=dtype) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=dtype) if need_bias else None
        grad_down = torch.zeros_like(down, dtype=dtype) if need_delta else None
        grad_up = torch.zeros_like(up, dtype=dtype) if need_delta else None
        total = hidden.new_zeros((), dtype=dtype)
        # the delta's products stay in `dtype` under torch.autocast too (which would run them in bf16 and
        # leave an in-place float32 addmm_ with a bf16 operand); the head's own product follows autocast
        exact = functools.partial(torch.autocast, hidden.device.type, enabled=False)
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            x, y = hidden[rows], targets[rows]
            logits = F.linear(x, weight, bias)
            if down is not None:  # + (x down^T) up^T in `dtype`: in place on float32 logits
                with exact():
                    low = x.to(dtype) @ down.to(dtype).t()
                    logits = logits.to(dtype).addmm_(low, up.to(dtype).t())
            log_probs = _log_softmax(logits, dtype)
            counted = y != IGNORE_INDEX
            safe_y = torch.where(counted, y, 0)
            total = total - (log_probs.gather(1, safe_y[:, None]).squeeze(1) * counted).sum()
            if grad_hidden is None and grad_weight is None and grad_bias is None and grad_down is None:
                continue
            # d(sum CE)/d logits = softmax - one_hot(target), zero on skipped rows; built in place
            grad_logits = log_probs.exp_()
            grad_logits[torch.arange(len(y)), safe_y] -= 1.0
            if not bool(counted.all()):
                grad_logits.mul_(counted[:, None])
            with exact():
                grad_low = grad_logits @ up.to(dtype) if down is not None else None  # (rows, rank)
            if grad_hidden is not None:
                grad_x = grad_logits.to(weight.dtype) @ weight
                if grad_low is not None:
                    with exact():
                        grad_x = grad_x.to(dtype) + grad_low @ down.to(dtype)
                grad_hidden[rows] = grad_x.to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ x.to(dtype)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
            if grad_down is not None:
                with exact():
                    grad_up += grad_logits.t() @ low
                    grad_down += grad_low.t() @ x.to(dtype)
        ctx.save_for_backward(grad_hidden, _cast(grad_weight, weight), _cast(grad_bias, bias),
                              _cast(grad_down, down), _cast(grad_up, up))
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):  # noqa: ANN001 - autograd signature
        scale = lambda g: None if g is None else g * grad_total.to(g.dtype)  # noqa: E731
        return (*(scale(g) for g in ctx.saved_tensors), None, None)


def _log_softmax(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """log_softmax of a chunk's logits in `dtype`: in place when they are in it already (the chunk's one
    vocabulary-sized tensor); from 16-bit logits, one fused kernel that reads them and writes `dtype` (no
    separate upcast copy)."""
    if logits.dtype == dtype:
        return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))
    return torch.log_softmax(logits, dim=-1, dtype=dtype)


def _cast(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return None if grad is None else grad.to(like.dtype)
