"""Greedy decoding through an artifact with qgraph's decode signature (qgraph.decode), numpy in and out:

    step(input_ids, attention_mask, past_attention_mask, position_ids, past) -> (logits, present)

past and present are the model's keys and values, [k_0, v_0, k_1, v_1, ...], each (B, heads, tokens, head_dim),
followed by a QST side network's blocks' (their own heads and head_dim).
A prompt goes in with a past of one zero slot that past_attention_mask hides; positions count every token so
far, padding included, and each new token is appended to every row: what `qm.generate` does, so the tokens
are comparable. Runners import this beside `_protocol`; it imports numpy only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Step = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]],
                tuple[np.ndarray, list[np.ndarray]]]


def empty_past(batch: int, past_shapes: Sequence[tuple[int, int, np.dtype]]) -> list[np.ndarray]:
    """One zero slot per key and value: past_shapes holds (heads, head_dim, dtype) of each."""
    return [np.zeros((batch, heads, 1, head_dim), dtype=dtype) for heads, head_dim, dtype in past_shapes]


def prefill_logits(step: Step, past_shapes: Sequence[tuple[int, int, np.dtype]], input_ids: np.ndarray,
                   attention_mask: np.ndarray) -> np.ndarray:
    """The prompt's logits (B, T, V), as the uncached interface returns them."""
    logits, _ = _prefill(step, past_shapes, input_ids, attention_mask)
    return logits


def greedy(step: Step, past_shapes: Sequence[tuple[int, int, np.dtype]], input_ids: np.ndarray,
           attention_mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """(B, new_tokens) greedy tokens after the prompt."""
    batch, length = input_ids.shape
    logits, past = _prefill(step, past_shapes, input_ids, attention_mask)
    past_mask = np.concatenate([np.zeros((batch, 1), np.int64), attention_mask.astype(np.int64)], axis=1)
    tokens = []
    for i in range(new_tokens):
        token = logits[:, -1].argmax(-1).astype(np.int64)[:, None]
        tokens.append(token)
        if i == new_tokens - 1:
            break
        positions = np.full((batch, 1), length + i, dtype=np.int64)
        logits, past = step(token, np.ones_like(token), past_mask, positions, past)
        past_mask = np.concatenate([past_mask, np.ones_like(token)], axis=1)
    return np.concatenate(tokens, axis=1)


def _prefill(step: Step, past_shapes: Sequence[tuple[int, int, np.dtype]], input_ids: np.ndarray,
             attention_mask: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    batch, length = input_ids.shape
    positions = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)).copy()
    return step(input_ids.astype(np.int64), attention_mask.astype(np.int64), np.zeros((batch, 1), np.int64),
                positions, empty_past(batch, past_shapes))
