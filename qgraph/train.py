"""A plain training loop with a rich progress bar: what the demo and the benchmarks share."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn


def train_causal_lm(model: nn.Module, batches: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer,
                    *, steps: int, console: Console | None = None, description: str = "training") -> list[float]:
    """Next-token training on `batches` of input_ids; returns the loss of every step."""
    model.train()
    losses = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=steps, loss="-")
        for input_ids in batches:
            loss = model(input_ids=input_ids, labels=input_ids).loss
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss became {loss.item()} at step {len(losses)}; lower the learning rate")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            progress.update(task, advance=1, loss=f"{loss.item():.3f}")
    model.eval()
    return losses
