"""tools/bench_qst_cls.py on a tiny Llama classifier: each configuration trains what it says and leaves the score
head alone, and the table reads its results."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
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


# --- bad input: usage errors before anything loads, and a failed configuration fails the command ----------------


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--batch-size", "1", "must be at least 2 (the first batch is the example the model is captured with"),
    ("--max-len", "1", "must be at least 2 (the first batch is the example the model is captured with"),
    ("--steps", "0", "must be at least 1, got 0"),
])
def test_a_count_the_run_cannot_use_is_a_usage_error_before_it_loads(monkeypatch, capsys, tmp_path, flag, value, says):
    monkeypatch.setattr(bench_qst_cls, "run_config", lambda *args: pytest.fail("ran despite a bad count"))
    with pytest.raises(SystemExit) as exit_:
        bench_qst_cls.main(["--run", "qst-nf4", "--json", str(tmp_path / "qst-nf4.json"), flag, value])
    assert exit_.value.code == 2
    assert f"argument {flag}: {says}" in capsys.readouterr().err


def fake_runs(monkeypatch, failing: tuple[str, ...]) -> None:
    """Each configuration's process replaced: those in `failing` fail, the others give a result."""
    def run_in_subprocess(script, flags, json_path, label, console):
        config = flags[flags.index("--run") + 1]
        return None if config in failing else asdict(bench_qst_cls.ClsResult(config, 1, losses=[1.0]))

    monkeypatch.setattr(bench_qst_cls, "run_in_subprocess", run_in_subprocess)
    monkeypatch.setattr(bench_qst_cls, "loss_curves", lambda *args: None)


def test_failed_configurations_fail_the_command_and_leave_earlier_results_when_none_ran(monkeypatch, tmp_path):
    (tmp_path / "results.json").write_text("earlier")
    fake_runs(monkeypatch, failing=bench_qst_cls.CONFIGS)
    with pytest.raises(SystemExit, match=f"^4 of 4 configurations failed: {', '.join(bench_qst_cls.CONFIGS)} "
                                         r"\(errors above\); nothing written"):
        bench_qst_cls.main(["--out", str(tmp_path)])
    assert (tmp_path / "results.json").read_text() == "earlier"
    fake_runs(monkeypatch, failing=("qlora",))
    with pytest.raises(SystemExit, match=r"^1 of 2 configurations failed: qlora \(errors above\); the other 1 written"):
        bench_qst_cls.main(["--out", str(tmp_path), "--configs", "qst-nf4", "qlora"])
    assert [r["config"] for r in json.loads((tmp_path / "results.json").read_text())] == ["qst-nf4"]


def test_an_output_path_that_is_a_file_is_a_usage_error(monkeypatch, capsys, tmp_path):
    fake_runs(monkeypatch, failing=bench_qst_cls.CONFIGS)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as exit_:
        bench_qst_cls.main(["--out", str(tmp_path / "a-file")])
    assert exit_.value.code == 2 and f"--out {tmp_path / 'a-file'} is a file" in capsys.readouterr().err
