"""Real English text that needs no download, and the token blocks and batches made from it.

The text is the Python reference documentation shipped with the standard library
(`pydoc_data.topics.topics`: about 80 topics, 0.47 MB on Python 3.11), so train and held-out
splits are reproducible on any machine with the same Python minor version.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from pydoc_data.topics import topics as PYDOC_TOPICS
from transformers import PreTrainedTokenizerBase

TOPIC_SEPARATOR = "\n\n"


def _join(topic_names: list[str]) -> str:
    return TOPIC_SEPARATOR.join(PYDOC_TOPICS[name] for name in topic_names)


def pydoc_text() -> str:
    """Every pydoc topic, in sorted topic order, blank-line separated."""
    return _join(sorted(PYDOC_TOPICS))


def _stable_rank(topic: str) -> bytes:
    # SHA-256 rather than hash(): str hashes are salted per process.
    return hashlib.sha256(topic.encode()).digest()


def split_topics(heldout_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """(train topics, held-out topics), each sorted; every topic in exactly one.

    Topics are taken in the order of the SHA-256 of their names (a fixed shuffle) into the held-out
    set until it holds at least `heldout_fraction` of all characters. Sizes vary 300-fold between
    topics, so counting characters rather than topics keeps the held-out text near the fraction
    asked for (it overshoots by at most one topic).
    """
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must lie strictly between 0 and 1, got {heldout_fraction}")
    total_chars = sum(len(text) for text in PYDOC_TOPICS.values())
    heldout, heldout_chars = [], 0
    for topic in sorted(PYDOC_TOPICS, key=_stable_rank):
        if heldout_chars >= heldout_fraction * total_chars:
            break
        heldout.append(topic)
        heldout_chars += len(PYDOC_TOPICS[topic])
    train = sorted(set(PYDOC_TOPICS) - set(heldout))
    if not train:
        raise ValueError(f"heldout_fraction={heldout_fraction} leaves no topic to train on")
    return train, sorted(heldout)


def train_heldout_split(heldout_fraction: float = 0.1) -> tuple[str, str]:
    """(train text, held-out text) of the pydoc topics, split by topic as `split_topics` says."""
    train, heldout = split_topics(heldout_fraction)
    return _join(train), _join(heldout)


def token_blocks(text: str, tokenizer: PreTrainedTokenizerBase, block_len: int) -> torch.Tensor:
    """The text tokenized once, cut into contiguous non-overlapping rows of `block_len` tokens.

    No special tokens are added (the blocks are slices of one running text) and the tail shorter
    than a block is dropped. Returns a LongTensor (n_blocks, block_len).
    """
    if block_len < 2:
        raise ValueError(f"block_len must be at least 2 (one input and one next token), got {block_len}")
    # verbose=False: the whole text is longer than the model's context on purpose; it is cut below.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n_blocks = len(ids) // block_len
    if n_blocks == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one block of {block_len}")
    return torch.tensor(ids[: n_blocks * block_len], dtype=torch.long).view(n_blocks, block_len)


def batches(blocks: torch.Tensor, batch_size: int, *, seed: int, steps: int) -> Iterator[torch.Tensor]:
    """`steps` batches of `batch_size` rows of `blocks`, in a shuffled order fixed by `seed`.

    The rows are drawn from one reshuffled pass over `blocks` after another (epochs), so every
    batch is full and every row is used equally often; a batch may straddle two epochs.
    """
    if batch_size < 1 or steps < 0:
        raise ValueError(f"need batch_size >= 1 and steps >= 0, got batch_size={batch_size}, steps={steps}")
    if len(blocks) == 0:
        raise ValueError("no blocks to draw batches from")
    # Validation above runs at the call; the drawing below runs lazily, batch by batch.
    return _shuffled_batches(blocks, batch_size, torch.Generator().manual_seed(seed), steps)


def _shuffled_batches(
    blocks: torch.Tensor, batch_size: int, generator: torch.Generator, steps: int
) -> Iterator[torch.Tensor]:
    pending = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(len(blocks), generator=generator)])
        yield blocks[pending[:batch_size]]
        pending = pending[batch_size:]


# --- a classification task from the same text --------------------------------------------------------------

# The eight topics with the most paragraphs of 200 characters or more (Python 3.11): which of them a paragraph
# comes from is the label
CLASSIFICATION_TOPICS = ("specialnames", "compound", "types", "string-methods", "typesseq", "debugger",
                         "formatstrings", "customization")


def topic_paragraphs(topics: tuple[str, ...] = CLASSIFICATION_TOPICS,
                     min_chars: int = 200) -> list[tuple[str, int]]:
    """(paragraph, index of its topic in `topics`) for every blank-line separated paragraph of at least
    `min_chars` characters: a sequence-classification task that needs no download."""
    missing = [t for t in topics if t not in PYDOC_TOPICS]
    if missing:
        raise ValueError(f"no pydoc topic named {', '.join(missing)}; this Python has {len(PYDOC_TOPICS)} topics")
    return [(paragraph, label) for label, topic in enumerate(topics)
            for paragraph in PYDOC_TOPICS[topic].split(TOPIC_SEPARATOR) if len(paragraph) >= min_chars]


def split_paragraphs(examples: list[tuple[str, int]], heldout_fraction: float = 0.2
                     ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, held-out): a paragraph is held out when the SHA-256 of its text falls in the first
    `heldout_fraction` of the hash range, so the split does not depend on order and is the same everywhere."""
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must lie strictly between 0 and 1, got {heldout_fraction}")
    cut = int(heldout_fraction * 2**32)
    held = [int.from_bytes(_stable_rank(text)[:4], "big") < cut for text, _ in examples]
    heldout = [e for e, h in zip(examples, held) if h]
    train = [e for e, h in zip(examples, held) if not h]
    return train, heldout


def classification_batch(examples: list[tuple[str, int]], tokenizer: PreTrainedTokenizerBase,
                         max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) of examples, each cut to `max_len` tokens and right-padded with the
    tokenizer's pad token (a classifier pools its last real token)."""
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token)")
    rows = [ids[:max_len] for ids in tokenizer([text for text, _ in examples], add_special_tokens=False)["input_ids"]]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask, torch.tensor([label for _, label in examples])
