"""A plain training loop with a rich progress bar: what the demo and the benchmarks share."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from qgraph.inputs import is_int
from qgraph.module import QGraphModule
from qgraph.optim import param_groups
from qgraph.side_network import SIDE_NETWORK_LR


def check_run_sizes(*, steps: int, batch_size: int, block_len: int, eval_blocks: int | None = None) -> None:
    """The sizes of a command-line run (the demo, `qgraph export`), refused before the model loads."""
    sizes = {"steps": (steps, 0), "batch_size": (batch_size, 1), "block_len": (block_len, 2)}
    if eval_blocks is not None:
        sizes["eval_blocks"] = (eval_blocks, 1)
    for name, (value, least) in sizes.items():
        if not is_int(value) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def default_optimizer(qm: QGraphModule) -> torch.optim.Optimizer:
    """AdamW as the papers train: LR-QAT's A, B and scales at their own rates (qgraph.param_groups),
    anything else (a QST side network) at SIDE_NETWORK_LR; betas (0.9, 0.95), no weight decay."""
    if any(config.name == "lrqat" for config in qm.plan.passes):
        return torch.optim.AdamW(param_groups(qm), betas=(0.9, 0.95), weight_decay=0.0)
    return torch.optim.AdamW(qm.trainable_parameters(), lr=SIDE_NETWORK_LR, betas=(0.9, 0.95), weight_decay=0.0)


def train_causal_lm(model: nn.Module, batches: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer,
                    *, steps: int, console: Console | None = None, description: str = "training") -> list[float]:
    """Next-token training on `batches` of input_ids; returns the loss of every step.

    The model trains in train mode and comes back in the mode it had, also when a step fails."""
    was_training = model.training
    model.train()
    losses: list[float] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn())
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task(description, total=steps, loss="-")
            for input_ids in batches:
                loss = model(input_ids=input_ids, labels=input_ids).loss
                value = loss.item()
                if not math.isfinite(value):
                    raise FloatingPointError(f"loss became {value} at step {len(losses)}; lower the learning rate")
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(value)
                progress.update(task, advance=1, loss=f"{value:.3f}")
    finally:
        model.train(was_training)
    return losses
