"""The Hugging Face Trainer trains a transformed module as it trains the model itself."""

import pytest
import torch
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
