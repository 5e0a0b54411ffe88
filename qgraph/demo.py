"""`qgraph demo`: the main job on the real SmolLM2-135M model and the pydoc text, end to end.

Load the model and score held-out perplexity; apply a plan (default lrqat-w4: at step 0 it is exactly
round-to-nearest int4) and score it; train a short run and score again; finalize; export the finalized
model to ONNX and score it again in ONNX Runtime, and write the GGUF file beside it (for plans GGUF can
hold); one table with every perplexity and size. QST plans also show a greedy continuation of a held-out
prompt, decoded with the side network in the loop.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

import qgraph
from qgraph.api import check_transform_options
from qgraph.data import batches, token_blocks, train_heldout_split
from qgraph.errors import ExportError, PlanError
from qgraph.evaluate import perplexity
from qgraph.export.check import load_runner
from qgraph.generate import generate
from qgraph.models import load_smollm2
from qgraph.plans import steps_train
from qgraph.report import format_bytes
from qgraph.train import check_block_fits, check_run_sizes, default_optimizer, train_causal_lm

SEED = 0
SAMPLE_PROMPT_CHARS, SAMPLE_NEW_TOKENS = 200, 24
# what the demo writes for the finalized model, in this order: ONNX is scored in its runtime, GGUF written
DEMO_FORMATS = ("onnx", "gguf")


@dataclass
class Row:
    model: str
    perplexity: float | None
    size: str = ""


def run_demo(plan: str, options: dict[str, Any], *, eval_blocks: int, block_len: int, steps: int,
             batch_size: int, console: Console, out_dir: Path | None = None,
             formats: tuple[str, ...] = DEMO_FORMATS) -> dict[str, float]:
    """Run the demo; returns {row name: held-out perplexity} for every scored row."""
    # a bad plan, option or size, or steps for a plan with nothing to train, fails now, not after the load
    check_run_sizes(steps=steps, batch_size=batch_size, block_len=block_len, eval_blocks=eval_blocks)
    plan_obj, plan_steps = check_transform_options(plan, options)
    if steps and not steps_train(plan_steps):
        raise PlanError(f"plan {plan!r} has nothing to train; run it with --steps 0 or pick a training plan")
    torch.manual_seed(SEED)
    model, tokenizer = load_smollm2()
    check_block_fits(model, block_len)
    train_text, heldout_text = train_heldout_split()
    heldout = token_blocks(heldout_text, tokenizer, block_len)[:eval_blocks]
    console.print(f"SmolLM2-135M-Instruct, held-out pydoc text: {len(heldout)} blocks x {block_len} tokens")

    rows = [Row("original (fp32)", perplexity(_logits(model), heldout, description="original"),
                format_bytes(_weight_bytes(model)))]
    qm = qgraph.transform(model, plan, console=console, **options)
    console.print(qm.report)
    step0 = f"{plan} (step 0{', = RTN int4' if plan.startswith('lrqat') else ''})"
    rows.append(Row(step0, perplexity(_logits(qm), heldout, description=plan)))
    if steps:
        train = token_blocks(train_text, tokenizer, block_len)
        train_causal_lm(qm, batches(train, batch_size, seed=SEED, steps=steps), default_optimizer(qm),
                        steps=steps, console=console, description=f"training {plan}")
        rows.append(Row(f"{plan} after {steps} steps", perplexity(_logits(qm), heldout, description="trained")))
    if any(config.name == "attach_side_taps" for config in plan_obj.passes):
        _show_sample(qm, tokenizer, heldout_text, console)
    deployable = qgraph.finalize(qm)
    rows.append(Row(f"{plan} finalized", perplexity(_logits(deployable), heldout, description="finalized")))
    with tempfile.TemporaryDirectory() as scratch:
        rows.extend(_exported_rows(deployable, Path(out_dir or scratch), formats, heldout, tokenizer, console))
    console.print(_results_table(rows, qm))
    return {row.model: row.perplexity for row in rows if row.perplexity is not None}


def _exported_rows(deployable: qgraph.QGraphModule, out_dir: Path, formats: tuple[str, ...], heldout: torch.Tensor,
                   tokenizer: Any, console: Console) -> list[Row]:
    """Export to each format; ONNX is scored again in ONNX Runtime. A format that cannot hold the plan is
    reported in the table with the reason (not silently left out)."""
    rows = []
    for format in formats:
        target = qgraph.export.get_target(format)
        path = out_dir / f"smollm2-{deployable.plan.name.removesuffix('+finalize')}{target.suffixes[0]}"
        try:
            with console.status(f"exporting to {format} and checking it in its runtime"):
                report = qgraph.export.export_report(deployable, path, format=format, console=console,
                                                     **qgraph.export.tokenizer_options(format, tokenizer))
        except ExportError as exc:
            console.print(f"[yellow]{format}: {exc}[/]")
            rows.append(Row(f"{format}: not exported (the reason is printed above)", None))
            continue
        size = format_bytes(report.file_bytes)
        if format == "onnx":
            rows.append(Row(f"ONNX Runtime ({path.name})", perplexity(_runtime_logits(target, path), heldout,
                                                                     description="onnx runtime"), size))
        else:
            rows.append(Row(f"{format} file written ({path.name}; parity {report.parity.max_abs_diff:.1e})", None, size))
    return rows


def _runtime_logits(target: qgraph.export.ExportTarget, path: Path):
    load, run = load_runner(target.runner_path)
    session = load(str(path), [])

    def logits(input_ids: torch.Tensor) -> torch.Tensor:
        mask = np.ones(tuple(input_ids.shape), dtype=np.int64)
        return torch.from_numpy(np.asarray(run(session, input_ids.numpy(), mask)))

    return logits


def _logits(model: torch.nn.Module):
    return lambda input_ids: model(input_ids=input_ids).logits


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _show_sample(qm: qgraph.QGraphModule, tokenizer: Any, text: str, console: Console) -> None:
    """Greedy continuation of a held-out prompt, with the side network in the decoding loop."""
    prompt = tokenizer(text[:SAMPLE_PROMPT_CHARS], return_tensors="pt").input_ids
    ids = generate(qm, prompt, max_new_tokens=SAMPLE_NEW_TOKENS)
    continuation = tokenizer.decode(ids[0, prompt.shape[1]:], skip_special_tokens=True)
    # Text, not markup: pydoc text is full of [brackets] that rich would read as tags
    console.print(Text.assemble(("sample", "bold"), " (greedy, side network in the loop): ",
                                text[:SAMPLE_PROMPT_CHARS], (continuation, "cyan")))


def _results_table(rows: list[Row], qm: qgraph.QGraphModule) -> Table:
    table = Table(title="held-out perplexity (pydoc text)", title_justify="left")
    table.add_column("model")
    table.add_column("perplexity", justify="right")
    table.add_column("weights / file", justify="right")
    for row in rows:
        table.add_row(row.model, "-" if row.perplexity is None else f"{row.perplexity:.3f}", row.size)
    rewritten = [r for p in qm.report.passes for r in p.rewritten]
    if rewritten:
        before = sum(r.bytes_before for r in rewritten)
        after = sum(r.bytes_after for r in rewritten)
        table.caption = f"decoder linears {format_bytes(before)} -> {format_bytes(after)} in training ({before / after:.1f}x)"
        table.caption_justify = "left"
    return table
