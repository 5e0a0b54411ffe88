"""`qgraph export`: a model from the command line, transformed (or loaded from a saved training run),
trained for a few steps, finalized and exported — the whole way from a checkpoint to a deployable file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console

import qgraph
from qgraph.api import check_transform_options
from qgraph.data import batches, token_blocks, train_heldout_split
from qgraph.errors import PlanError
from qgraph.export.program import deployable
from qgraph.export.report import ExportReport
from qgraph.models import byte_tokenizer, resolve_model
from qgraph.plans import steps_train
from qgraph.train import check_block_fits, check_run_sizes, default_optimizer, train_causal_lm

SEED = 0


def export_trained(model_spec: str, *, plan: str | None, formats: list[str], out_dir: Path, steps: int = 0,
                   from_dir: Path | None = None, options: dict[str, Any] | None = None, batch_size: int = 4,
                   block_len: int = 256, decode: bool = False, console: Console | None = None) -> list[ExportReport]:
    """Load `model_spec`, transform it with `plan` and `options` (or restore the run saved in `from_dir`, whose
    plan and options are the saved ones: giving either too is an error), train `steps`
    steps on the pydoc training text, and export it in each of `formats` into `out_dir`; with `decode`, each
    file holds the KV-cache signature (`<name>-decode<suffix>`)."""
    console = console or Console()
    options = options or {}
    formats = [format.lower() for format in formats]  # as get_target reads them: file names follow
    check_run_sizes(steps=steps, batch_size=batch_size, block_len=block_len)
    for format in formats:  # an unknown format fails before the model is loaded
        qgraph.export.get_target(format)
    if decode:  # likewise a format without the KV-cache signature
        qgraph.export.check_decode_formats(formats)
    export_options = {qgraph.export.DECODE_OPTION: True} if decode else {}
    # likewise a bad plan or option, or steps for a plan with nothing to train
    if from_dir is not None and (plan is not None or options):
        given = " and ".join(name for name, value in (("--plan", plan), ("--set", options)) if value)
        raise PlanError(f"--from {from_dir} restores the saved run with its own plan and options; drop {given} "
                        "(or leave out --from to transform the model anew)")
    if from_dir is None:
        if plan is None:
            raise PlanError("give a plan (--plan) or a saved run to restore (--from)")
        _, plan_steps = check_transform_options(plan, options)
        if steps and not steps_train(plan_steps):
            raise PlanError(f"plan {plan!r} has nothing to train; export it with --steps 0")
    torch.manual_seed(SEED)
    with console.status(f"loading {model_spec}"):
        model, tokenizer = resolve_model(model_spec)
    check_block_fits(model, block_len)
    if from_dir is not None:
        from qgraph.pretrained import from_pretrained

        with console.status(f"restoring the training run saved in {from_dir}"):
            qm = from_pretrained(model, from_dir)
    else:
        with console.status(f"capturing and running plan {plan}"):
            qm = qgraph.transform(model, plan, **options)
    console.print(qm.report)
    export_options_of = {format: {**export_options, **qgraph.export.tokenizer_options(format, tokenizer)}
                         for format in formats}
    if steps:
        if not qm.trainable_parameters():
            raise PlanError(f"plan {qm.plan.name!r} has nothing to train; export it with --steps 0")
        # a plan a format cannot take fails before the training steps, not after them: one finalized copy,
        # checked against every format (the trained module is finalized again below)
        untrained, _ = deployable(qm)
        for format in formats:
            qgraph.export.check_fits(untrained, format, **export_options_of[format])
        # a tiny random model has a byte-sized vocabulary and no tokenizer of its own
        train_text, _ = train_heldout_split()
        blocks = token_blocks(train_text, tokenizer or byte_tokenizer(), block_len)
        train_causal_lm(qm, batches(blocks, batch_size, seed=SEED, steps=steps), default_optimizer(qm),
                        steps=steps, console=console, description=f"training {qm.plan.name}")
    name = model_file_stem(model_spec)
    finalized, notes = deployable(qm)  # once, for every format
    for note in notes:
        console.print(note, style="yellow")
    reports = []
    for format in formats:
        suffix = qgraph.export.get_target(format).suffixes[0]
        kind = f"{'-aoti' if format == 'aoti' else ''}{'-decode' if decode else ''}"
        path = out_dir / f"{name}-{qm.plan.name}{kind}{suffix}"
        with console.status(f"exporting to {format} and running it in its runtime"):
            reports.append(qgraph.export.export_report(finalized, path, format=format, console=console,
                                                       **export_options_of[format]))
    return reports


def model_file_stem(model_spec: str) -> str:
    """The model's part of the file names: a directory's own name (`~/m`, `.` and `dir/` resolved first), or
    the built-in model's name."""
    path = Path(model_spec).expanduser()
    return path.resolve().name if path.is_dir() else model_spec
