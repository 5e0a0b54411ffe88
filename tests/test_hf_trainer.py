"""The Hugging Face Trainer trains a transformed module as it trains the model itself."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import Dataset

import qgraph
from qgraph.models import tiny_causal_lm
from tests.conftest import random_ids


class TokenBlocks(Dataset):
    """Rows of random tokens with the columns a causal-LM dataset has, plus one forward does not take
    (the Trainer must drop it, as it drops a tokenizer's extra columns)."""

    def __init__(self, rows: int = 8, length: int = 16) -> None:
        self.ids = random_ids((rows, length), seed=0)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.ids[i]
        return {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row, "source_id": torch.tensor(i)}


@pytest.mark.parametrize("plan", ["lrqat-w4", "qst-nf4"])
def test_trainer_trains_only_what_the_plan_trains(plan, tmp_path):
    from transformers import Trainer, TrainingArguments

    qm = qgraph.transform(tiny_causal_lm("llama", layers=2), plan)
    before = {name: p.detach().clone() for name, p in qm.named_parameters()}
    # gradient accumulation: the Trainer passes num_items_in_batch, which the chunked loss honours
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             num_train_epochs=6, learning_rate=1e-2, logging_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=qm, args=args, train_dataset=TokenBlocks())
    trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3])
    changed = {name for name, p in qm.named_parameters() if not torch.equal(p.detach(), before[name])}
    trainable = {name for name, p in qm.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable


def test_forward_names_the_hugging_face_arguments():
    import inspect

    qm = qgraph.transform(tiny_causal_lm("llama", layers=1), "nf4")
    assert list(inspect.signature(qm.forward).parameters) == ["input_ids", "attention_mask", "labels", "loss_kwargs"]


def _trainer(trainer_class, qm, output_dir, max_steps: int):
    from transformers import TrainingArguments

    # a constant learning rate: a schedule spans max_steps, and the interrupted run is 2 steps of a 4-step one
    args = TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=2, max_steps=max_steps,
                             learning_rate=1e-2, lr_scheduler_type="constant", save_strategy="steps", save_steps=2,
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    return trainer_class(model=qm, args=args, train_dataset=TokenBlocks())


def _trainable(qm) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in qm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("trainer_class", ["Trainer", "QGraphTrainer"])
def test_a_resumed_run_equals_an_uninterrupted_one(trainer_class, tmp_path):
    import transformers

    from qgraph.hf_trainer import QGraphTrainer

    cls = QGraphTrainer if trainer_class == "QGraphTrainer" else transformers.Trainer
    straight = qgraph.transform(tiny_causal_lm("llama", layers=2), "lrqat-w4")
    _trainer(cls, straight, tmp_path / "straight", 4).train()

    interrupted = qgraph.transform(tiny_causal_lm("llama", layers=2), "lrqat-w4")
    _trainer(cls, interrupted, tmp_path / "run", 2).train()
    resumed = qgraph.transform(tiny_causal_lm("llama", layers=2), "lrqat-w4")
    _trainer(cls, resumed, tmp_path / "run", 4).train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))

    want, got = _trainable(straight), _trainable(resumed)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_qgraph_trainer_checkpoints_hold_the_trainable_tensors_only(tmp_path):
    from qgraph.hf_trainer import QGraphTrainer

    qm = qgraph.transform(tiny_causal_lm("llama", layers=2), "lrqat-w4")
    _trainer(QGraphTrainer, qm, tmp_path, 2).train()
    checkpoint = tmp_path / "checkpoint-2"
    trainable_bytes = sum(p.numel() * p.element_size() for p in qm.trainable_parameters())
    model_files = [f for f in checkpoint.iterdir() if f.suffix == ".safetensors"]
    assert [f.name.startswith("trainable-") for f in model_files] == [True]
    assert model_files[0].stat().st_size < trainable_bytes + 16_384  # the tensors and a safetensors header
    frozen_bytes = sum(b.numel() * b.element_size() for b in qm.buffers())
    assert frozen_bytes > trainable_bytes / 4  # so that saving the frozen weights would show in the size
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "trainer_state.json").is_file()


def test_qgraph_trainer_takes_only_transformed_modules():
    from qgraph.hf_trainer import QGraphTrainer

    with pytest.raises(qgraph.QGraphError, match="QGraphTrainer trains the module qgraph.transform returned"):
        QGraphTrainer(model=tiny_causal_lm("llama", layers=1))


class LinearInputDtypes(TorchDispatchMode):
    """The dtypes of the activations that reach qgraph's linear ops."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.qgraph.lrqat_linear.default, torch.ops.qgraph.nf4_linear.default):
            self.dtypes.add(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("plan", ["lrqat-w4", "qst-nf4"])
def test_trainer_bf16_runs_the_plan_in_mixed_precision(plan, tmp_path):
    """TrainingArguments(bf16=True) on a float32 module: the Trainer's autocast reaches qgraph's ops (bf16
    activations into every linear), the trained parameters stay float32 and learn."""
    from transformers import Trainer, TrainingArguments

    qm = qgraph.transform(tiny_causal_lm("llama", layers=2), plan)
    before = {name: p.detach().clone() for name, p in qm.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, num_train_epochs=2,
                             learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, bf16=True)
    trainer = Trainer(model=qm, args=args, train_dataset=TokenBlocks())
    with LinearInputDtypes() as seen:
        trainer.train()
    assert seen.dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in qm.trainable_parameters())
    assert all(not torch.equal(p.detach(), before[name]) for name, p in qm.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("saved_with", [{"plan": "lrqat-w4", "rank": 8}, {"plan": "qst-nf4"}])
def test_a_plain_checkpoint_of_another_plan_or_rank_is_refused_before_anything_loads(saved_with, tmp_path):
    import transformers

    from qgraph.errors import PretrainedError
    from qgraph.hf_trainer import QGraphTrainer

    other = qgraph.transform(tiny_causal_lm("llama", layers=1), **saved_with)
    _trainer(transformers.Trainer, other, tmp_path / "plain", 2).train()
    qm = qgraph.transform(tiny_causal_lm("llama", layers=1), "lrqat-w4")
    before = {name: t.clone() for name, t in qm.state_dict().items()}
    with pytest.raises(PretrainedError, match="is not of this module \\(plan 'lrqat-w4'\\).*Nothing was loaded"):
        _trainer(QGraphTrainer, qm, tmp_path / "run", 4).train(
            resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-2"))
    assert all(torch.equal(t, before[name]) for name, t in qm.state_dict().items())


def test_qgraph_trainer_refuses_to_train_a_module_with_nothing_to_train(tmp_path):
    from qgraph.errors import PlanError
    from qgraph.hf_trainer import QGraphTrainer

    trainer = _trainer(QGraphTrainer, qgraph.transform(tiny_causal_lm("llama", layers=1), "nf4"), tmp_path, 2)
    with pytest.raises(PlanError, match="plan 'nf4' has nothing to train"):
        trainer.train()


def test_qgraph_trainer_resumes_a_plain_checkpoint_of_the_same_plan(tmp_path):
    import transformers

    from qgraph.hf_trainer import QGraphTrainer

    saved = qgraph.transform(tiny_causal_lm("llama", layers=1), "lrqat-w4")
    _trainer(transformers.Trainer, saved, tmp_path / "plain", 2).train()
    qm = qgraph.transform(tiny_causal_lm("llama", layers=1), "lrqat-w4")
    _trainer(QGraphTrainer, qm, tmp_path / "run", 2)._load_from_checkpoint(str(tmp_path / "plain" / "checkpoint-2"))
    assert all(torch.equal(p, saved.state_dict()[name]) for name, p in _trainable(qm).items())


@pytest.mark.parametrize("trainer_class", ["Trainer", "QGraphTrainer"])
@pytest.mark.parametrize("plan", ["lrqat-w4", "qst-nf4"])
def test_a_model_with_tied_embeddings_checkpoints_and_resumes_with_either_trainer(trainer_class, plan, tmp_path):
    import transformers

    from qgraph.hf_trainer import QGraphTrainer

    def tied():
        return qgraph.transform(tiny_causal_lm("llama", layers=1, tie_word_embeddings=True), plan)

    cls = QGraphTrainer if trainer_class == "QGraphTrainer" else transformers.Trainer
    straight = tied()
    _trainer(cls, straight, tmp_path / "straight", 4).train()
    _trainer(cls, tied(), tmp_path / "run", 2).train()  # the plain Trainer's save refused the tied pair before
    resumed = tied()
    _trainer(cls, resumed, tmp_path / "run", 4).train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    want, got = _trainable(straight), _trainable(resumed)
    assert want.keys() == got.keys() and all(torch.equal(got[name], want[name]) for name in want)


def test_state_dict_leaves_out_tied_names_and_load_state_dict_fills_them_in():
    qm = qgraph.transform(tiny_causal_lm("llama", layers=1, tie_word_embeddings=True), "lrqat-w4")
    assert qm.tied_aliases() == {"graph_module.lm_head.weight": "graph_module.model.embed_tokens.weight"}
    state = qm.state_dict()
    assert "graph_module.lm_head.weight" not in state and "graph_module.model.embed_tokens.weight" in state
    other = qgraph.transform(tiny_causal_lm("llama", layers=1, tie_word_embeddings=True, seed=1), "lrqat-w4")
    other.load_state_dict(state)  # strict: the tied name is filled in from the one kept
    assert torch.equal(other.graph_module.lm_head.weight, qm.graph_module.lm_head.weight)
    assert other.graph_module.lm_head.weight is other.graph_module.model.embed_tokens.weight
    both = state | {"graph_module.lm_head.weight": state["graph_module.model.embed_tokens.weight"]}
    other.load_state_dict(both)  # a state holding both names (as state_dict wrote it before) loads too
