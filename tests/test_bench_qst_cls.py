"""tools/bench_qst_cls.py on a tiny Llama classifier: each configuration trains what it says and leaves the score
head alone, and the table reads its results."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from qgraph.models import tiny_sequence_classifier
from tests.conftest import random_ids

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # the tools import benchlib as a sibling
import bench_qst_cls  # noqa: E402


def train(module, optimizer, ids, mask, labels, steps=4):
    losses = []
    for _ in range(steps):
        loss = module(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("config", bench_qst_cls.CONFIGS)
def test_each_configuration_trains_its_own_tensors_and_the_score_head_only_when_named(config):
    if config.startswith("qlora"):
        pytest.importorskip("peft", reason="the bench extra (peft) is not installed: pip install -e .[bench]")
    model = tiny_sequence_classifier("llama", num_labels=3)
    head = model.score.weight.detach().clone()
    ids, mask = random_ids((4, 12), seed=7).clamp(min=1), torch.ones(4, 12, dtype=torch.long)
    mask[1, 8:] = 0
    ids[1, 8:] = 0  # right padding with the pad token
    module, optimizer = bench_qst_cls.build(config, model, {"input_ids": ids, "attention_mask": mask})
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    assert trainable and all(p.requires_grad for p in trainable)
    losses = train(module, optimizer, ids, mask, torch.tensor([0, 1, 2, 1]))
    assert losses[-1] < losses[0]
    # PEFT's modules_to_save keeps the original head beside the trained copy; qgraph trains its own copy
    scores = {name: t for name, t in module.state_dict().items() if "score." in name and name.endswith(".weight")}
    assert scores
    moved = [name for name, t in scores.items() if not torch.equal(t, head)]
    assert bool(moved) == config.endswith("-head"), (config, sorted(scores))
    assert torch.equal(model.score.weight.detach(), head) or config == "qlora-head"  # PEFT trains the model's own
    assert bench_qst_cls.accuracy(module.eval(), [("x", 0)], _Tokenizer(), max_len=4) in (0.0, 1.0)


class _Tokenizer:
    """What classification_batch needs of a tokenizer: ids of each text and a pad id."""

    pad_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) % 200 + 1 for c in text] for text in texts]}


def test_markdown_table_reads_each_result():
    result = bench_qst_cls.ClsResult("qst-nf4", 10, accuracy=0.5, majority=0.3, step_seconds=1.25,
                                     losses=[2.0] * 10)
    assert bench_qst_cls.markdown_table([result]).splitlines()[-1] == "| qst-nf4 | 10 | 50.0% | 30.0% | 2.000 | 1.25 |"
