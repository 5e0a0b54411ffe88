"""`QGraphTrainer`: the Hugging Face Trainer with checkpoints of the trainable state only, as PEFT's are.

The plain `transformers.Trainer` trains a transformed module as it is, but checkpoints anything that is
not a `PreTrainedModel` or a PEFT model by writing its whole `state_dict()`: every frozen 4-bit weight
again at every save (2.0 MB for 0.6 MB of LR-QAT tensors on a 2-layer test Llama). `QGraphTrainer` writes
each checkpoint with `qm.save_pretrained` (the plan as it ran and the trainable tensors, atomically) and
resumes, or loads the best model, with `qgraph.from_pretrained` in place: the parameters the optimizer
holds stay the same objects, and a resumed run equals an uninterrupted one bit for bit.

    trainer = QGraphTrainer(model=qm, args=TrainingArguments(...), train_dataset=...)
    trainer.train(resume_from_checkpoint=True)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from qgraph.errors import QGraphError
from qgraph.module import QGraphModule
from qgraph.pretrained import from_pretrained
from qgraph.saved_state import CONFIG_FILE


class QGraphTrainer(Trainer):
    """A Trainer whose checkpoints hold a QGraphModule's trainable state only (see the module docstring)."""

    def __init__(self, model: QGraphModule, *args, **kwargs) -> None:
        if not isinstance(model, QGraphModule):
            raise QGraphError(f"QGraphTrainer trains the module qgraph.transform returned, got {type(model).__name__}; "
                              "use transformers.Trainer for other models")
        super().__init__(model, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        self._qgraph_module().save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))  # as Trainer keeps it beside the model

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        if not (Path(resume_from_checkpoint) / CONFIG_FILE).is_file():
            super()._load_from_checkpoint(resume_from_checkpoint, model)  # a checkpoint of the plain Trainer
            return
        from_pretrained(self._qgraph_module(), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None or not (Path(best) / CONFIG_FILE).is_file():
            super()._load_best_model()
            return
        from_pretrained(self._qgraph_module(), best)

    def _qgraph_module(self) -> QGraphModule:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
