"""Activation checkpoints and torch.compile on SmolLM2-135M: activation memory, step time compiled vs eager.

Every configuration runs in its own process (so peak RSS and compile caches are its own), on the same
batches (batch 4 x 256 tokens by default):
    python tools/bench_compile.py --steps 8 --out out/bench_compile
writes results.json, results.md (the README table) and memory_time.png. One configuration alone:
    python tools/bench_compile.py --run lrqat-w4 --device cpu --steps 5 --json /tmp/ckpt.json
Step-time ratios that must hold on a noisy machine, from configurations stepped in turn in one process:
    python tools/bench_compile.py --interleave lrqat-w4 lrqat-w4-nockpt lrqat-w4-compiled --steps 6

Configurations: nf4 inference (forward only) eager and compiled; lrqat-w4 training without checkpoints,
with them (the plan's default), and compiled; the same three for qst-nf4 when that plan exists (its
checkpoints go around the side blocks). Memory is MemTracker's peak by category (eager runs: dynamo does
not trace under MemTracker's dispatch mode) and, on CUDA, torch.cuda.max_memory_allocated. Time is the
median step after the first steps (which compile). Runs on CPU, and on CUDA too where it is available.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress, TextColumn

from benchlib import (MEMORY_STEPS, SEED, capture_example_size, check_writable, exit_if_failed, loss_of, positive_int,
                      run_in_subprocess, tracked_memory, train_step, write_json)

QST_PLAN = "qst-nf4"
QST_SIDE_BLOCKS = {"target": "modules", "include": ("qst_side.blocks.*",)}
CONFIGS = ("nf4-infer", "nf4-infer-compiled", "lrqat-w4-nockpt", "lrqat-w4", "lrqat-w4-compiled",
           "qst-nf4-nockpt", "qst-nf4", "qst-nf4-compiled")
WARMUP_STEPS = 2  # the first compiled step compiles; the second settles caches


@dataclass
class Result:
    config: str
    device: str
    steps: int
    memory: dict[str, int] = field(default_factory=dict)  # MemTracker peak by category (eager only)
    cuda_max_allocated: int = 0
    peak_rss: int = 0
    step_seconds: float = 0.0
    first_step_seconds: float = 0.0  # includes compilation for the compiled configurations
    losses: list[float] = field(default_factory=list)


def plan_of(config: str) -> tuple[str, dict]:
    """(plan, transform keywords) of a configuration."""
    eager = config.removesuffix("-compiled")  # the suffixes come in this order: qst-nf4-nockpt-compiled
    base = eager.removesuffix("-nockpt")
    kwargs: dict = {"compile": config.endswith("-compiled")}
    if base == "nf4-infer":
        return "nf4", kwargs
    if eager.endswith("-nockpt"):
        kwargs["checkpoint"] = "none"
    elif base == QST_PLAN:
        kwargs["checkpoint"] = QST_SIDE_BLOCKS
    return base, kwargs


def available(config: str) -> str:
    """'' if the configuration can run in this checkout, else why not."""
    from qgraph.api import resolve_transform
    from qgraph.errors import PlanError

    plan, kwargs = plan_of(config)
    try:  # transform's own up-front checks (a plan or checkpoint choice this checkout lacks)
        resolve_transform(plan, {}, checkpoint=kwargs.get("checkpoint"))
    except PlanError as error:
        return str(error)
    return ""


def build(config: str, model: torch.nn.Module, example: torch.Tensor):
    import qgraph

    plan, kwargs = plan_of(config)
    qm = qgraph.transform(model, plan, example_inputs=example, **kwargs)
    if plan == "nf4":
        return qm, None
    groups = qgraph.param_groups(qm) if plan.startswith("lrqat") else qm.trainable_parameters()
    return qm, torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)


def infer_step(module, _optimizer, input_ids) -> float:
    with torch.no_grad():
        return float(loss_of(module, input_ids))


def model_and_batches(device: str, steps: int, batch_size: int, block_len: int):
    """SmolLM2 on `device` and the `steps` training batches every configuration runs on."""
    from qgraph.data import batches, token_blocks, train_heldout_split
    from qgraph.models import load_smollm2

    torch.manual_seed(SEED)
    model, tokenizer = load_smollm2(progress=False)
    model.to(device)
    train_text, _ = train_heldout_split()
    stream = batches(token_blocks(train_text, tokenizer, block_len), batch_size, seed=SEED, steps=steps)
    return model, (ids.to(device) for ids in stream)


def timed_step(step, module, optimizer, input_ids: torch.Tensor) -> tuple[float, float]:
    """(loss, seconds) of one step, waiting for the device to finish it."""
    start = time.perf_counter()
    loss = step(module, optimizer, input_ids)
    if input_ids.is_cuda:
        torch.cuda.synchronize()
    return loss, time.perf_counter() - start


def run_config(config: str, device: str, steps: int, batch_size: int, block_len: int) -> Result:
    from qgraph.memory import peak_rss_bytes, reset_peak_rss

    model, stream = model_and_batches(device, steps, batch_size, block_len)
    result = Result(config, device, steps)
    reset_peak_rss()
    first = next(stream)
    module, optimizer = build(config, model, first)
    step = train_step if optimizer is not None else infer_step
    module.train(optimizer is not None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loss, result.first_step_seconds = timed_step(step, module, optimizer, first)
    result.losses.append(loss)
    compiled = config.endswith("-compiled")
    if not compiled and optimizer is not None:
        result.memory = tracked_memory(module, optimizer, step, stream, result.losses, first.device)
    else:
        for _ in range(WARMUP_STEPS - 1):
            result.losses.append(step(module, optimizer, next(stream)))
    times = []
    for input_ids in stream:
        loss, seconds = timed_step(step, module, optimizer, input_ids)
        result.losses.append(loss)
        times.append(seconds)
    result.step_seconds = statistics.median(times) if times else 0.0
    result.peak_rss = peak_rss_bytes()
    if device == "cuda":
        result.cuda_max_allocated = torch.cuda.max_memory_allocated()
    return result


@dataclass
class Interleaved:
    """Step times of configurations stepped in turn: each one's first step (which compiles) and the timed ones."""

    first: dict[str, float]
    seconds: dict[str, list[float]]


def interleaved_step_times(configs: list[str], device: str, rounds: int, batch_size: int, block_len: int,
                           console: Console) -> Interleaved:
    """Step times of several configurations built in one process and stepped in turn on the same batches.

    On a shared VM a process's speed drifts by tens of percent from one process to the next, more
    than some of the effects measured here; steps taken in turn (ABBA order, so neither always goes
    first) see the same drift, so their ratio holds where per-process medians do not. No memory
    figures: the configurations share the process."""
    model, batches = model_and_batches(device, WARMUP_STEPS + rounds, batch_size, block_len)
    stream = list(batches)
    built = {}
    for config in configs:
        module, optimizer = build(config, model, stream[0])
        module.train(optimizer is not None)
        built[config] = (module, optimizer, train_step if optimizer is not None else infer_step)
    timed = Interleaved(first={}, seconds={config: [] for config in configs})
    with Progress(*Progress.get_default_columns(), TextColumn("{task.fields[config]}"), console=console) as progress:
        task = progress.add_task("steps in turn (the first compiles)", total=len(stream) * len(configs), config="")
        for index, input_ids in enumerate(stream):
            for config in configs if index % 2 == 0 else configs[::-1]:
                progress.update(task, config=config)
                module, optimizer, step = built[config]
                _, seconds = timed_step(step, module, optimizer, input_ids)
                if index == 0:
                    timed.first[config] = seconds
                if index >= WARMUP_STEPS:
                    timed.seconds[config].append(seconds)
                progress.advance(task)
    return timed


def interleaved_table(timed: Interleaved, device: str) -> str:
    """Median step of each configuration and its ratio to the first one's, step by step, and its first step."""
    times = timed.seconds
    first, *_ = times
    lines = [f"| configuration | device | steps | median step (s) | step time / {first}'s (median of per-step ratios) "
             "| first step (s), compile included |",
             "|---|---|---:|---:|---:|---:|"]
    for config, seconds in times.items():
        ratio = statistics.median(t / t0 for t, t0 in zip(seconds, times[first], strict=True))
        lines.append(f"| {config} | {device} | {len(seconds)} | {statistics.median(seconds):.2f} | {ratio:.2f}x "
                     f"| {timed.first[config]:.1f} |")
    return "\n".join(lines) + "\n"


# --- all configurations, side by side ---------------------------------------------------------------------


def run_all(args: argparse.Namespace, console: Console) -> tuple[list[Result], list[str]]:
    """(the results of every configuration on every device, "CONFIG on DEVICE" of each run tried); a configuration
    this checkout cannot run is skipped, not tried, and one whose process failed has no result."""
    args.out.mkdir(parents=True, exist_ok=True)
    results, tried = [], []
    for device in args.devices:
        for config in args.configs:
            why_not = available(config)
            if why_not:
                console.print(f"{config}: skipped ({why_not})")
                continue
            tried.append(run_label(config, device))
            flags = ["--run", config, "--device", device, "--steps", str(args.steps), "--batch-size",
                     str(args.batch_size), "--block-len", str(args.block_len)]
            data = run_in_subprocess(__file__, flags, args.out / f"{config}-{device}.json",
                                     f"{tried[-1]}: {args.steps} steps", console)
            if data is not None:
                results.append(Result(**data))
                console.print(f"{tried[-1]}: step {results[-1].step_seconds:.2f} s")
    return results, tried


def run_label(config: str, device: str) -> str:
    return f"{config} on {device}"


def _peer(results: list[Result], r: Result, suffix: str) -> Result | None:
    """The eager run `r` is compared with: plan's default (checkpointed) run for -compiled and -nockpt."""
    base = r.config.removesuffix(suffix)
    return next((p for p in results if p.config == base and p.device == r.device), None) if base != r.config else None


def markdown_table(results: list[Result]) -> str:
    gib = lambda n: f"{n / 2**30:.2f}" if n else "-"  # noqa: E731
    lines = ["| configuration | device | steps | activations+temp (GiB) | tracked peak (GiB) | CUDA max allocated (GiB) "
             "| peak RSS (GiB) | step (s) | first step (s) | vs eager checkpointed |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        m = r.memory
        ratio = "-"
        compiled_peer, plain_peer = _peer(results, r, "-compiled"), _peer(results, r, "-nockpt")
        if compiled_peer and r.step_seconds:
            ratio = f"{compiled_peer.step_seconds / r.step_seconds:.2f}x faster"
        elif plain_peer and m and plain_peer.memory:
            activations = lambda x: x.memory["Activation"] + x.memory["Temp"]  # noqa: E731
            ratio = (f"activations {activations(r) / activations(plain_peer):.2f}x, "
                     f"step {r.step_seconds / plain_peer.step_seconds:.2f}x")
        lines.append(f"| {r.config} | {r.device} | {r.steps} | {gib(m.get('Activation', 0) + m.get('Temp', 0))} "
                     f"| {gib(m.get('Total', 0))} | {gib(r.cuda_max_allocated)} | {r.peak_rss / 2**30:.2f} "
                     f"| {r.step_seconds:.2f} | {r.first_step_seconds:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def chart(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    tracked = [r for r in results if r.memory]
    left.bar([f"{r.config}\n{r.device}" for r in tracked],
             [(r.memory["Activation"] + r.memory["Temp"]) / 2**30 for r in tracked], color="#8ecae6")
    left.set_ylabel("activations + temp at the peak (GiB, MemTracker)")
    left.set_title("activation memory, with and without checkpoints")
    right.bar([f"{r.config}\n{r.device}" for r in results], [r.step_seconds for r in results], color="#f4a261")
    right.set_ylabel("median step time (s)")
    right.set_title("step time, eager vs compiled")
    for axis in (left, right):
        axis.tick_params(axis="x", rotation=30, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", choices=CONFIGS, help="run one configuration in this process")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="with --run")
    parser.add_argument("--json", type=Path, help="with --run: where to write its result")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--devices", nargs="+", choices=("cpu", "cuda"),
                        default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    parser.add_argument("--steps", type=positive_int, default=8)
    parser.add_argument("--batch-size", type=capture_example_size, default=4)
    parser.add_argument("--block-len", type=capture_example_size, default=256)
    parser.add_argument("--out", type=Path, default=Path("out/bench_compile"))
    parser.add_argument("--interleave", nargs="+", choices=CONFIGS, metavar="CONFIG",
                        help="step times only: these configurations in one process, stepped in turn "
                             "(--steps rounds after the warm-up); ratios to the first one")
    args = parser.parse_args(argv)
    if args.steps < 1 + MEMORY_STEPS + 1 and not args.interleave:
        parser.error(f"--steps must be at least {2 + MEMORY_STEPS} (a first step, {MEMORY_STEPS} measured for "
                     "memory or warm-up, then at least one timed)")
    if "cuda" in args.devices + [args.device] and not torch.cuda.is_available():
        parser.error("cuda asked for, but torch.cuda.is_available() is False")
    if args.interleave:
        if len(set(args.interleave)) != len(args.interleave):
            parser.error("--interleave needs distinct configurations")
        for config in args.interleave:
            if why_not := available(config):
                parser.error(f"{config}: {why_not}")
        check_writable(parser, args.out, "--out")
        console = Console()
        timed = interleaved_step_times(args.interleave, args.device, args.steps, args.batch_size, args.block_len,
                                       console)
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "interleaved.json", {"device": args.device, **asdict(timed)})
        table = interleaved_table(timed, args.device)
        (args.out / "interleaved.md").write_text(table)
        console.print(table, soft_wrap=True)
        return
    if args.run:
        if args.json is None:
            parser.error("--run needs --json FILE (where to write the result)")
        why_not = available(args.run)
        if why_not:
            parser.error(f"{args.run}: {why_not}")
        check_writable(parser, args.json, "--json", directory=False)
        result = run_config(args.run, args.device, args.steps, args.batch_size, args.block_len)
        write_json(args.json, asdict(result))
        return
    check_writable(parser, args.out, "--out")
    console = Console()
    results, tried = run_all(args, console)
    if results:  # none: the earlier results.* stay as they were
        write_json(args.out / "results.json", [asdict(r) for r in results])
        table = markdown_table(results)
        (args.out / "results.md").write_text(table)
        chart(results, args.out / "memory_time.png")
        console.print(table, soft_wrap=True)
        console.print(f"written to {args.out}/ (results.json, results.md, memory_time.png)")
    exit_if_failed(tried, {run_label(r.config, r.device) for r in results}, args.out)


if __name__ == "__main__":
    main()
