"""QST against QLoRA on sequence classification (issue 17): which of eight pydoc topics a paragraph comes from
(`qgraph.data.topic_paragraphs`, 335 training and 98 held-out paragraphs), SmolLM2-135M with a sequence
classification head, held-out accuracy after the same steps on the same batches.

    python tools/bench_qst_cls.py --steps 100 --out out/bench_qst_cls

runs each configuration in its own process and writes results.json, results.md and losses.png. All start from
the same randomly drawn score head (576 -> 8, seed 0). qst-nf4 and qlora leave it frozen, so what differs is only
how each method adapts the model in front of it: qst-nf4 trains its side network (lr 1e-2), QLoRA (bench_qst's:
NF4 backbone, LoRA r=16 on every decoder linear) its adapters (lr 2e-4). The -head variants train the score
head too, each at its method's learning rate: qst-nf4-head through transform(..., train_head=True), qlora-head
as PEFT's task_type="SEQ_CLS" does (the head in modules_to_save). Needs the `bench` extra (peft, matplotlib).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from bench_qst import lora
from benchlib import (capture_example_size, check_writable, exit_if_failed, loss_curves, positive_int,
                      run_in_subprocess, write_json)
from qgraph.side_network import SIDE_NETWORK_LR

SEED = 0
CONFIGS = ("qst-nf4", "qlora", "qst-nf4-head", "qlora-head")


@dataclass
class ClsResult:
    config: str
    steps: int
    accuracy: float = 0.0  # on the held-out paragraphs
    majority: float = 0.0  # the held-out share of the most common topic: what a constant guess scores
    step_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    head_checksum: float = 0.0  # sum of the score head's weight: both configurations start from the same head


def classifier(num_labels: int) -> tuple[torch.nn.Module, object]:
    """SmolLM2-135M with a sequence-classification head drawn from SEED (the decoder as load_smollm2 gives it)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from qgraph.models import smollm2_dir

    directory = smollm2_dir(progress=False)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    torch.manual_seed(SEED)
    model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=num_labels, dtype=torch.float32,
                                                               pad_token_id=tokenizer.pad_token_id)
    return model.eval(), tokenizer


def build(config: str, model: torch.nn.Module, example: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """(module, AdamW over its trainable tensors); the score head trains in the -head configurations only."""
    train_head = config.endswith("-head")
    if config.startswith("qst-nf4"):
        import qgraph

        qm = qgraph.transform(model, "qst-nf4", example_inputs=example, train_head=train_head)
        return qm, torch.optim.AdamW(qm.trainable_parameters(), lr=SIDE_NETWORK_LR, betas=(0.9, 0.95),
                                     weight_decay=0.0)  # as bench_qst.build's
    # SEQ_CLS puts the score head in modules_to_save (trained); no task type leaves it frozen
    return lora(model, quantize=True, checkpointing=False, task_type="SEQ_CLS" if train_head else None)


def accuracy(module: torch.nn.Module, examples: list, tokenizer, max_len: int, batch_size: int = 16) -> float:
    from qgraph.data import classification_batch

    correct = 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            ids, mask, labels = classification_batch(examples[start:start + batch_size], tokenizer, max_len)
            correct += int((module(input_ids=ids, attention_mask=mask).logits.argmax(-1) == labels).sum())
    return correct / len(examples)


def run_config(config: str, steps: int, batch_size: int, max_len: int) -> ClsResult:
    from qgraph.data import CLASSIFICATION_TOPICS, batches, classification_batch, split_paragraphs, topic_paragraphs

    train, heldout = split_paragraphs(topic_paragraphs())
    model, tokenizer = classifier(len(CLASSIFICATION_TOPICS))
    result = ClsResult(config, steps, head_checksum=float(model.score.weight.detach().sum()))
    counts = [sum(label == k for _, label in heldout) for k in range(len(CLASSIFICATION_TOPICS))]
    result.majority = max(counts) / len(heldout)
    ids, mask, _ = classification_batch(train[:batch_size], tokenizer, max_len)
    module, optimizer = build(config, model, {"input_ids": ids, "attention_mask": mask})
    module.train()
    times = []
    for rows in batches(torch.arange(len(train)), batch_size, seed=SEED, steps=steps):
        ids, mask, labels = classification_batch([train[i] for i in rows.tolist()], tokenizer, max_len)
        start = time.perf_counter()
        loss = module(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        result.losses.append(loss.item())
    module.eval()
    result.step_seconds = statistics.median(times)
    result.accuracy = accuracy(module, heldout, tokenizer, max_len)
    return result


def markdown_table(results: list[ClsResult]) -> str:
    lines = ["| configuration | steps | held-out accuracy | majority topic | train loss, last 10 | step (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        tail = r.losses[-10:]
        lines.append(f"| {r.config} | {r.steps} | {r.accuracy:.1%} | {r.majority:.1%} | "
                     f"{sum(tail) / max(1, len(tail)):.3f} | {r.step_seconds:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", choices=CONFIGS, help="run one configuration in this process")
    parser.add_argument("--json", type=Path, help="with --run: where to write its result")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--steps", type=positive_int, default=100)
    parser.add_argument("--batch-size", type=capture_example_size, default=8)
    parser.add_argument("--max-len", type=capture_example_size, default=128, help="tokens kept of each paragraph")
    parser.add_argument("--out", type=Path, default=Path("out/bench_qst_cls"))
    args = parser.parse_args(argv)
    if args.run:
        if args.json is None:
            parser.error("--run needs --json FILE (where to write the result)")
        check_writable(parser, args.json, "--json", directory=False)
        write_json(args.json, asdict(run_config(args.run, args.steps, args.batch_size, args.max_len)))
        return
    check_writable(parser, args.out, "--out")
    console = Console()
    args.out.mkdir(parents=True, exist_ok=True)
    flags = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-len", str(args.max_len)]
    results = []
    for config in args.configs:
        data = run_in_subprocess(__file__, ["--run", config, *flags], args.out / f"{config}.json",
                                 f"{config}: {args.steps} steps", console)
        if data is not None:
            results.append(ClsResult(**data))
    if len({r.head_checksum for r in results}) > 1:
        console.print("[red]the configurations started from different score heads[/]")
    if results:  # none: the earlier results.* stay as they were
        write_json(args.out / "results.json", [asdict(r) for r in results])
        table = markdown_table(results)
        (args.out / "results.md").write_text(table)
        loss_curves({r.config: r.losses for r in results}, args.out / "losses.png")
        console.print(table)
    exit_if_failed(args.configs, {r.config for r in results}, args.out)


if __name__ == "__main__":
    sys.exit(main())
