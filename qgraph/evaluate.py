"""Held-out perplexity: the number every quantization method here is judged by."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import track

from qgraph.inputs import holds_integers, value_range

# input_ids (B, T) -> logits (B, T, V)
LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def causal_lm_forward(model: torch.nn.Module) -> LogitsFn:
    """Adapt a Hugging Face causal LM to `input_ids -> logits`, on the model's own device."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"causal_lm_forward takes a causal LM (a torch.nn.Module), got {type(model).__name__}")
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")

    def forward(input_ids: torch.Tensor) -> torch.Tensor:
        # use_cache=False: scoring needs no KV cache, and building one costs memory.
        return model(input_ids=input_ids.to(device), use_cache=False).logits

    return forward


def check_blocks_fit(ids_range: tuple[int, int], vocab_size: int | None = None) -> None:
    """Token ids (min, max) the logits can score: in [0, vocab_size), once the logits say how many (an
    embedding's or cross_entropy's own error names neither the ids nor the fix)."""
    low, high = ids_range
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        allowed = "ids >= 0" if vocab_size is None else f"{vocab_size} ids ([0, {vocab_size - 1}])"
        raise ValueError(f"blocks hold token ids in [{low}, {high}]; the logits score {allowed}: tokenize with the "
                         "model's own tokenizer")


def perplexity(
    forward: LogitsFn,
    blocks: torch.Tensor,
    batch_size: int = 4,
    progress: bool = True,
    description: str = "perplexity",
) -> float:
    """exp of the mean next-token cross-entropy over every scored token of `blocks` (n, T).

    Each block scores its T - 1 next-token predictions; the mean weighs every token alike,
    whatever batch it fell in. Runs under no_grad rather than inference_mode so that a forward
    compiled or exported for training is not retraced.
    """
    if not isinstance(blocks, torch.Tensor):
        raise TypeError(f"blocks must be a tensor of token ids (n_blocks, block_len), got {type(blocks).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if blocks.ndim != 2 or blocks.shape[1] < 2 or len(blocks) == 0:
        raise ValueError(f"blocks must be (n_blocks >= 1, block_len >= 2), got {tuple(blocks.shape)}")
    if not holds_integers(blocks):
        raise TypeError(f"blocks must hold integer token ids, got {blocks.dtype}")
    ids_range = value_range(blocks)  # one host sync for the whole run
    check_blocks_fit(ids_range)
    total_nll = 0.0
    scored_tokens = 0
    starts = range(0, len(blocks), batch_size)
    with torch.no_grad():
        for start in track(starts, description=description, disable=not progress, console=Console(stderr=True)):
            input_ids = blocks[start : start + batch_size]
            logits = forward(input_ids)
            if not isinstance(logits, torch.Tensor):  # a model passed as it is returns its output class
                raise TypeError(f"forward must return the logits tensor, got {type(logits).__name__}; for a model, "
                                "pass qgraph.evaluate.causal_lm_forward(model)")
            if logits.ndim != 3 or logits.shape[:2] != input_ids.shape:
                raise ValueError(f"forward returned logits {tuple(logits.shape)} for input_ids {tuple(input_ids.shape)}")
            check_blocks_fit(ids_range, logits.shape[-1])
            targets = input_ids[:, 1:].to(logits.device, torch.int64)  # cross_entropy's class indices are int64
            # float32 at least, summed in float64: a long run of bf16 sums would drift.
            nll = F.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), targets.flatten(), reduction="sum"
            )
            total_nll += nll.double().item()
            scored_tokens += targets.numel()
    return math.exp(total_nll / scored_tokens)
