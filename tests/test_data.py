import pytest
import torch
from pydoc_data.topics import topics

from qgraph.data import (
    CLASSIFICATION_TOPICS, batches, classification_batch, pydoc_text, split_paragraphs, split_topics, token_blocks,
    topic_paragraphs, train_heldout_split,
)
from qgraph.models import byte_tokenizer


def test_pydoc_text_is_every_topic_in_sorted_order():
    text = pydoc_text()
    assert text == pydoc_text()
    assert len(text) > 100_000
    assert text.startswith(topics[min(topics)])
    assert text.index(topics["assert"]) < text.index(topics["with"])


def test_split_is_deterministic_disjoint_and_complete():
    train, heldout = split_topics(0.1)
    assert (train, heldout) == split_topics(0.1)
    assert train and heldout
    assert not set(train) & set(heldout)
    assert set(train) | set(heldout) == set(topics)


def test_heldout_text_is_near_the_fraction_asked_for():
    train_text, heldout_text = train_heldout_split(0.1)
    share = len(heldout_text) / (len(train_text) + len(heldout_text))
    assert 0.1 <= share < 0.25
    assert train_heldout_split(0.1) == (train_text, heldout_text)


def test_heldout_text_holds_exactly_the_heldout_topics():
    _, heldout = split_topics(0.1)
    train_text, heldout_text = train_heldout_split(0.1)
    for topic in heldout:
        assert topics[topic] in heldout_text
    assert topics[heldout[0]] not in train_text


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5])
def test_split_rejects_fractions_outside_the_open_interval(fraction):
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_topics(fraction)


def test_token_blocks_are_contiguous_and_drop_the_tail():
    text = "abcdefghij" * 5  # 50 byte tokens
    blocks = token_blocks(text, byte_tokenizer(), 16)
    assert blocks.shape == (3, 16) and blocks.dtype == torch.long
    all_ids = byte_tokenizer()(text, add_special_tokens=False)["input_ids"]
    assert blocks.flatten().tolist() == all_ids[:48]


def test_token_blocks_of_pydoc_text():
    _, heldout = train_heldout_split()
    blocks = token_blocks(heldout, byte_tokenizer(), 256)
    assert blocks.shape == (len(heldout.encode()) // 256, 256)


def test_token_blocks_rejects_text_shorter_than_a_block():
    with pytest.raises(ValueError, match="fewer than one block"):
        token_blocks("short", byte_tokenizer(), 16)


def test_batches_are_deterministic_per_seed():
    blocks = torch.arange(10).unsqueeze(1).expand(10, 4)
    first = [b.clone() for b in batches(blocks, 3, seed=0, steps=7)]
    again = list(batches(blocks, 3, seed=0, steps=7))
    other_seed = list(batches(blocks, 3, seed=1, steps=7))
    assert len(first) == 7 and all(b.shape == (3, 4) for b in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other_seed))


def test_batches_cycle_epochs_using_every_block_equally():
    blocks = torch.arange(10).unsqueeze(1)
    drawn = torch.cat(list(batches(blocks, 4, seed=3, steps=5))).flatten()  # 20 rows = 2 epochs
    assert sorted(drawn[:10].tolist()) == list(range(10))
    assert sorted(drawn[10:].tolist()) == list(range(10))
    assert drawn[:10].tolist() != list(range(10))  # shuffled


def test_batches_rejects_bad_arguments_at_the_call():
    with pytest.raises(ValueError, match="batch_size"):
        batches(torch.zeros(4, 2, dtype=torch.long), 0, seed=0, steps=1)
    with pytest.raises(ValueError, match="no blocks"):
        batches(torch.zeros(0, 2, dtype=torch.long), 2, seed=0, steps=1)


# --- the topic classification task ---------------------------------------------------------------------------


def test_topic_paragraphs_label_each_long_paragraph_with_its_topic():
    examples = topic_paragraphs(min_chars=200)
    assert {label for _, label in examples} == set(range(len(CLASSIFICATION_TOPICS)))
    assert all(len(text) >= 200 and text in topics[CLASSIFICATION_TOPICS[label]] for text, label in examples)
    assert len(topic_paragraphs(("try", "import"), min_chars=1)) > len(topic_paragraphs(("try", "import")))
    with pytest.raises(ValueError, match="no pydoc topic named not-a-topic"):
        topic_paragraphs(("try", "not-a-topic"))


def test_paragraph_split_is_disjoint_complete_and_independent_of_order():
    examples = topic_paragraphs()
    train, heldout = split_paragraphs(examples)
    assert sorted(train + heldout) == sorted(examples) and not set(train) & set(heldout)
    assert 0.1 < len(heldout) / len(examples) < 0.3
    assert sorted(split_paragraphs(examples[::-1])[1]) == sorted(heldout)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        split_paragraphs(examples, heldout_fraction=1.0)


def test_classification_batch_cuts_right_pads_and_masks():
    tokenizer = byte_tokenizer()
    with pytest.raises(ValueError, match="no pad token"):
        classification_batch([("abc", 0)], tokenizer, max_len=8)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    ids, mask, labels = classification_batch([("abcdef", 1), ("xy", 0)], tokenizer, max_len=4)
    assert ids.shape == mask.shape == (2, 4) and labels.tolist() == [1, 0]
    assert ids[0].tolist() == tokenizer("abcd", add_special_tokens=False)["input_ids"]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert ids[1, 2:].tolist() == [tokenizer.pad_token_id] * 2
