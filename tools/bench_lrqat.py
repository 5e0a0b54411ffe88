"""LR-QAT against its peers on SmolLM2-135M: peak memory by category, step time, held-out perplexity.

Every configuration runs in its own process (so peak RSS is its own), on the same batches:
    python tools/bench_lrqat.py --steps 200 --out out/bench_lrqat
writes results.json, results.md (the README table) and memory_time.png. One configuration alone:
    python tools/bench_lrqat.py --run lrqat-w4 --steps 20 --json /tmp/lrqat.json

Peers: full fine-tuning, torchao full-model QAT (int4 per-channel symmetric fake quantization of the
same decoder linears; with and without gradient checkpointing); baselines without training: the
unquantized model and rtn-w4; peqa-w4 (scales only). Needs the `bench` extra (peft, torchao, matplotlib).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

TRAINED = ("lrqat-w4", "lrqat-w4-packed", "peqa-w4", "full-ft", "torchao-qat", "torchao-qat-ckpt")
EVAL_ONLY = ("fp", "rtn-w4")
CONFIGS = (*EVAL_ONLY, *TRAINED)
PEER = "torchao-qat"  # ratios are quoted against full-model QAT, as in the paper
SEED = 0


@dataclass
class Result:
    config: str
    steps: int
    memory: dict[str, int] = field(default_factory=dict)  # MemTracker peak by category
    peak_rss: int = 0
    step_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    perplexity: float = 0.0


# --- one configuration, in its own process ------------------------------------------------------------


def build(config: str, model: torch.nn.Module):
    """(module to train or score, optimizer or None) for a configuration."""
    import qgraph

    if config == "fp":
        return model, None
    if config in ("rtn-w4", "peqa-w4", "lrqat-w4", "lrqat-w4-packed"):
        plan = "lrqat-w4" if config == "lrqat-w4-packed" else config
        options = {"phi_format": "int-packed"} if config == "lrqat-w4-packed" else {}
        qm = qgraph.transform(model, plan, **options)
        if config == "rtn-w4":
            return qm, None
        # PEQA trains scales alone: the LR-QAT scale rate (1e-5) would barely move them
        lr_s = 1e-4 if config == "peqa-w4" else 1e-5
        return qm, torch.optim.AdamW(qgraph.param_groups(qm, lr_ab=1e-3, lr_s=lr_s), betas=(0.9, 0.95))
    if config == "full-ft":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    if config.startswith("torchao-qat"):
        return torchao_qat(model, checkpointing=config.endswith("ckpt"))
    raise ValueError(f"unknown configuration {config!r}; choose from {', '.join(CONFIGS)}")


def torchao_qat(model: torch.nn.Module, *, checkpointing: bool):
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    weight = IntxFakeQuantizeConfig(torch.int4, granularity="per_channel", is_symmetric=True)
    # the same sites qgraph rewrites: every linear inside a decoder block, not the LM head
    quantize_(model, QATConfig(weight_config=weight, step="prepare"),
              filter_fn=lambda module, fqn: isinstance(module, torch.nn.Linear) and ".layers." in fqn)
    for name, param in model.named_parameters():
        param.requires_grad_(".layers." in name and "proj" in name)  # embeddings, norms, head frozen as in LR-QAT
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(trainable, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)


def loss_of(module: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    import qgraph

    if isinstance(module, qgraph.QGraphModule):
        return module(input_ids=input_ids, labels=input_ids).loss
    return module(input_ids=input_ids, labels=input_ids, use_cache=False).loss


def train_step(module, optimizer, input_ids) -> float:
    loss = loss_of(module, input_ids)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def run_config(config: str, steps: int, timing_steps: int, eval_blocks: int, batch_size: int, block_len: int) -> Result:
    from qgraph.data import batches, token_blocks, train_heldout_split
    from qgraph.evaluate import perplexity
    from qgraph.memory import FrozenAwareMemTracker, peak_breakdown, peak_rss_bytes, reset_peak_rss
    from qgraph.models import load_smollm2

    torch.manual_seed(SEED)
    model, tokenizer = load_smollm2(progress=False)
    train_text, heldout_text = train_heldout_split()
    heldout = token_blocks(heldout_text, tokenizer, block_len)[:eval_blocks]
    result = Result(config, steps if config in TRAINED else 0)
    reset_peak_rss()
    module, optimizer = build(config, model)
    if optimizer is not None:
        stream = batches(token_blocks(train_text, tokenizer, block_len), batch_size, seed=SEED, steps=steps)
        module.train()
        # memory: two steps under MemTracker (the second one has optimizer state), then peak RSS
        tracker = FrozenAwareMemTracker()
        tracker.track_external(module, optimizer)
        with tracker:
            for _ in range(2):
                result.losses.append(train_step(module, optimizer, next(stream)))
                tracker.reset_mod_stats()
        result.memory = peak_breakdown(tracker)
        times = []
        for _ in range(timing_steps):
            start = time.perf_counter()
            result.losses.append(train_step(module, optimizer, next(stream)))
            times.append(time.perf_counter() - start)
        result.step_seconds = statistics.median(times)
        for input_ids in stream:
            result.losses.append(train_step(module, optimizer, input_ids))
        module.eval()
    result.peak_rss = peak_rss_bytes()
    result.perplexity = perplexity(lambda ids: _logits(module, ids), heldout, progress=False)
    return result


def _logits(module, input_ids):
    import qgraph

    if isinstance(module, qgraph.QGraphModule):
        return module(input_ids=input_ids).logits
    return module(input_ids=input_ids, use_cache=False).logits


# --- all configurations, side by side ---------------------------------------------------------------------


def run_all(args: argparse.Namespace, console: Console) -> list[Result]:
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for config in args.configs:
        path = args.out / f"{config}.json"
        command = [sys.executable, __file__, "--run", config, "--json", str(path), *_shared_flags(args)]
        with console.status(f"{config}: {args.steps if config in TRAINED else 0} steps in its own process"):
            completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode:
            console.print(f"[red]{config} failed[/]\n{completed.stderr[-3000:]}")
            continue
        results.append(Result(**json.loads(path.read_text())))
        console.print(f"{config}: done ({_summary(results[-1])})")
    return results


def _shared_flags(args: argparse.Namespace) -> list[str]:
    return ["--steps", str(args.steps), "--timing-steps", str(args.timing_steps), "--eval-blocks",
            str(args.eval_blocks), "--batch-size", str(args.batch_size), "--block-len", str(args.block_len)]


def _summary(result: Result) -> str:
    mem = result.memory.get("Total", 0) / 2**30
    return f"tracked peak {mem:.2f} GiB, RSS {result.peak_rss / 2**30:.2f} GiB, step {result.step_seconds:.2f} s, ppl {result.perplexity:.2f}"


def markdown_table(results: list[Result]) -> str:
    peer = next((r for r in results if r.config == PEER), None)
    lines = ["| configuration | steps | tracked peak (GiB) | params+buffers | grads | opt state | activations+temp "
             "| peak RSS (GiB) | step (s) | memory vs torchao QAT | time vs torchao QAT | held-out ppl |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        m = r.memory
        gib = lambda n: f"{n / 2**30:.2f}" if m else "-"  # noqa: E731
        mem_ratio = f"{peer.memory['Total'] / m['Total']:.2f}x less" if peer and m and peer.memory else "-"
        time_ratio = f"{peer.step_seconds / r.step_seconds:.2f}x faster" if peer and r.step_seconds and peer.step_seconds else "-"
        lines.append(
            f"| {r.config} | {r.steps} | {gib(m.get('Total', 0))} | {gib(m.get('Parameter', 0) + m.get('Buffer', 0))} "
            f"| {gib(m.get('Gradient', 0))} | {gib(m.get('Optstate', 0))} | {gib(m.get('Activation', 0) + m.get('Temp', 0))} "
            f"| {r.peak_rss / 2**30:.2f} | {r.step_seconds:.2f} | {mem_ratio} | {time_ratio} | {r.perplexity:.2f} |")
    return "\n".join(lines) + "\n"


def chart(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in results if r.memory]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    bottom = [0.0] * len(trained)
    for category in ("Parameter", "Buffer", "Gradient", "Optstate", "Activation", "Temp"):
        values = [r.memory.get(category, 0) / 2**30 for r in trained]
        left.bar([r.config for r in trained], values, bottom=bottom, label=category)
        bottom = [b + v for b, v in zip(bottom, values)]
    left.set_ylabel("GiB at the tracked peak (MemTracker)")
    left.set_title("peak memory by category")
    left.legend(fontsize=8)
    left.tick_params(axis="x", rotation=30)
    right.bar([r.config for r in trained], [r.step_seconds for r in trained], color="#f4a261")
    right.set_ylabel("median step time (s)")
    right.set_title("training step, batch 4 x 256 tokens")
    right.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", choices=CONFIGS, help="run one configuration in this process")
    parser.add_argument("--json", type=Path, help="with --run: where to write its result")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--timing-steps", type=int, default=3)
    parser.add_argument("--eval-blocks", type=int, default=56, help="held-out blocks (56 is the whole split)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-len", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("out/bench_lrqat"))
    args = parser.parse_args()
    if args.steps < 2 + args.timing_steps:
        parser.error(f"--steps must be at least {2 + args.timing_steps} (2 measured for memory, then the timed ones)")
    if args.run:
        result = run_config(args.run, args.steps, args.timing_steps, args.eval_blocks, args.batch_size, args.block_len)
        args.json.write_text(json.dumps(asdict(result), indent=2))
        return
    console = Console()
    results = run_all(args, console)
    (args.out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    table = markdown_table(results)
    (args.out / "results.md").write_text(table)
    chart(results, args.out / "memory_time.png")
    console.print(table)
    console.print(f"written to {args.out}/ (results.json, results.md, memory_time.png)")


if __name__ == "__main__":
    main()
