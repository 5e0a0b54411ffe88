"""`qgraph demo`: the main job on the real SmolLM2-135M model and the pydoc text.

Load the model, score held-out perplexity, apply a plan, show what it did, train when the plan has
something to train, score again (and after finalize for LR-QAT plans; QST plans also show a greedy
continuation of a held-out prompt, decoded with the side network in the loop).
"""

from __future__ import annotations

from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

import qgraph
from qgraph.data import batches, token_blocks, train_heldout_split
from qgraph.errors import PlanError
from qgraph.evaluate import perplexity
from qgraph.generate import generate
from qgraph.models import load_smollm2
from qgraph.plans import get_plan, resolve_steps
from qgraph.train import train_causal_lm
from qgraph.report import format_bytes
from qgraph.side_network import SIDE_NETWORK_LR

SEED = 0
SAMPLE_PROMPT_CHARS, SAMPLE_NEW_TOKENS = 200, 24


def run_demo(plan: str, options: dict[str, Any], *, eval_blocks: int, block_len: int, steps: int,
             batch_size: int, console: Console) -> dict[str, float]:
    plan_obj = get_plan(plan)
    # a bad plan or option, or steps for a plan with nothing to train, fails now, not after the load
    steps_resolved = resolve_steps(plan_obj, options)
    if steps and not any(_trains(options) for _, options in steps_resolved):
        raise PlanError(f"plan {plan!r} has nothing to train; run it with --steps 0 or pick a training plan")
    torch.manual_seed(SEED)
    model, tokenizer = load_smollm2()
    train_text, heldout_text = train_heldout_split()
    heldout = token_blocks(heldout_text, tokenizer, block_len)[:eval_blocks]
    console.print(f"SmolLM2-135M-Instruct, held-out pydoc text: {len(heldout)} blocks x {block_len} tokens")

    results = {"original (fp32)": perplexity(_logits(model), heldout, description="original")}
    qm = qgraph.transform(model, plan_obj, console=console, **options)
    console.print(qm.report)
    results[plan] = perplexity(_logits(qm), heldout, description=plan)

    if steps:
        train = token_blocks(train_text, tokenizer, block_len)
        optimizer = _optimizer(qm)
        train_causal_lm(qm, batches(train, batch_size, seed=SEED, steps=steps), optimizer,
                                     steps=steps, console=console, description=f"training {plan}")
        results[f"{plan} after {steps} steps"] = perplexity(_logits(qm), heldout, description="trained")
    if _has_pass(plan_obj, "attach_side_taps"):
        _show_sample(qm, tokenizer, heldout_text, console)
    if _has_lrqat(plan_obj):
        deployable = qgraph.finalize(qm)
        results[f"{plan} finalized (int)"] = perplexity(_logits(deployable), heldout, description="finalized")
    console.print(_results_table(results, qm))
    return results


def _logits(model: torch.nn.Module):
    return lambda input_ids: model(input_ids=input_ids).logits


def _trains(options: Any) -> bool:
    # LR-QAT options say what trains; a pass that always trains (attach_side_taps) says `trains`
    return any(bool(getattr(options, flag, False)) for flag in ("train_ab", "train_scale", "trains"))


def _has_lrqat(plan: qgraph.Plan) -> bool:
    return _has_pass(plan, "lrqat")


def _has_pass(plan: qgraph.Plan, name: str) -> bool:
    return any(config.name == name for config in plan.passes)


def _show_sample(qm: qgraph.QGraphModule, tokenizer: Any, text: str, console: Console) -> None:
    """Greedy continuation of a held-out prompt, with the side network in the decoding loop."""
    prompt = tokenizer(text[:SAMPLE_PROMPT_CHARS], return_tensors="pt").input_ids
    ids = generate(qm, prompt, max_new_tokens=SAMPLE_NEW_TOKENS)
    continuation = tokenizer.decode(ids[0, prompt.shape[1]:], skip_special_tokens=True)
    # Text, not markup: pydoc text is full of [brackets] that rich would read as tags
    console.print(Text.assemble(("sample", "bold"), " (greedy, side network in the loop): ",
                                text[:SAMPLE_PROMPT_CHARS], (continuation, "cyan")))


def _optimizer(qm: qgraph.QGraphModule) -> torch.optim.Optimizer:
    if _has_lrqat(qm.plan):
        return torch.optim.AdamW(qgraph.param_groups(qm), betas=(0.9, 0.95), weight_decay=0.0)
    return torch.optim.AdamW(qm.trainable_parameters(), lr=SIDE_NETWORK_LR, weight_decay=0.0)


def _results_table(results: dict[str, float], qm: qgraph.QGraphModule) -> Table:
    table = Table(title="held-out perplexity (pydoc text)", title_justify="left")
    table.add_column("model")
    table.add_column("perplexity", justify="right")
    for name, value in results.items():
        table.add_row(name, f"{value:.3f}")
    rewritten = [r for p in qm.report.passes for r in p.rewritten]
    if rewritten:
        before = sum(r.bytes_before for r in rewritten)
        after = sum(r.bytes_after for r in rewritten)
        table.caption = f"weights {format_bytes(before)} -> {format_bytes(after)} ({before / after:.1f}x)"
        table.caption_justify = "left"
    return table
