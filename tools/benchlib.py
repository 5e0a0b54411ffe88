"""What the benchmark tools share: one configuration per process, the memory/timing/perplexity loop,
the markdown table, the chart and the command line.

A tool describes itself as a `Bench` (its configurations, which of them train, the peer that ratios are
quoted against, and `build(config, model) -> (module, optimizer or None)`) and calls `main(bench)`. Optionally
`pairs` quotes some configurations against a peer of their own (the cell names it), and
`deployed(config, module) -> module or None` gives the form a configuration deploys as, scored once more,
`autocast` runs some configurations' steps and scoring under torch.autocast (mixed precision),
and `pte(config, deployed module, held-out blocks, path) -> PteFigures or None` writes that form as an
ExecuTorch .pte and measures it (with --pte: each export takes minutes).
Every configuration runs in its own process (so its peak RSS is its own) on the same batches: `--jobs N` runs N
of them at once, each with its share of the cores (perplexity runs; step times then come from quiet runs,
`--timing-from`), and `--seed S` draws another batch order and global RNG stream for all of them (the spread
between seeds is what a difference between configurations has to beat).

The command-line checks every tool here shares (positive counts, writable outputs) live here too: a bad flag is a
usage error before any model loads, not a traceback minutes later.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console

SEED = 0
MEMORY_STEPS = 2  # steps under MemTracker: the second one has optimizer state
CATEGORIES = ("Parameter", "Buffer", "Gradient", "Optstate", "Activation", "Temp")


@dataclass
class Result:
    config: str
    steps: int
    memory: dict[str, int] = field(default_factory=dict)  # MemTracker peak by category
    peak_rss: int = 0
    step_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    perplexity: float = 0.0
    # the flags it ran with (steps aside), so that --reuse never mixes runs made with different ones
    settings: dict[str, int | str] = field(default_factory=dict)
    # where memory, peak RSS and step time come from when not from this run (--timing-from)
    timing_from: str = ""
    # held-out perplexity of the deployed form (Bench.deployed) after training; 0 when not measured
    deployed_perplexity: float = 0.0
    # the deployed form as a .pte (Bench.pte, --pte): asdict(PteFigures), empty when not made
    pte: dict[str, int | float | str] = field(default_factory=dict)
    # a configuration trained under autocast (Bench.autocast) scored again without it, as its float32
    # module deploys; 0 for the others
    float32_perplexity: float = 0.0


@dataclass(frozen=True)
class PteFigures:
    """A deployed module written as an ExecuTorch .pte and run by ExecuTorch's runtime; 0 where not measured."""

    file_bytes: int = 0
    prefill_ms: float = 0.0  # median of timed prefills after a warm-up
    max_abs_diff: float = 0.0  # of the .pte's logits against the deployed PyTorch module's, same tokens
    top1_agreement: float = 0.0  # fraction of positions whose argmax token agrees
    note: str = ""  # what XNNPACK delegated, or why no file was written


@dataclass(frozen=True)
class Bench:
    doc: str
    configs: tuple[str, ...]
    trained: tuple[str, ...]
    peer: str  # ratios are quoted against this configuration
    peer_label: str  # how the table's ratio columns name it
    build: Callable  # (config, model) -> (module to train or score, optimizer or None)
    script: str  # the tool's own file, run once per configuration
    default_out: Path
    # config -> the configuration its ratios are quoted against instead of `peer` (its like-for-like peer)
    pairs: Mapping[str, str] = field(default_factory=dict)
    # (config, trained module) -> the module it deploys as (scored too), or None when there is none to score
    deployed: Callable | None = None
    # (config, deployed module, held-out blocks, path) -> PteFigures, or None for a configuration without a .pte
    pte: Callable | None = None
    # what --configs runs when not given (None: every configuration); variants kept for a study stay opt-in
    default_configs: tuple[str, ...] | None = None
    # config -> the dtype its training steps and scoring run in under torch.autocast (a float32 model in
    # mixed precision, as the HF Trainer's bf16=True runs it)
    autocast: Mapping[str, torch.dtype] = field(default_factory=dict)


# --- one configuration, in its own process ------------------------------------------------------------


def full_finetuning(model: torch.nn.Module, lr: float = 1e-5) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Every parameter trains: the reference point of every benchmark here."""
    return model, torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)


def loss_of(module: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    import qgraph

    if isinstance(module, qgraph.QGraphModule):
        return module(input_ids=input_ids, labels=input_ids).loss
    return module(input_ids=input_ids, labels=input_ids, use_cache=False).loss


def logits_of(module: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    import qgraph

    if isinstance(module, qgraph.QGraphModule):
        return module(input_ids=input_ids).logits
    return module(input_ids=input_ids, use_cache=False).logits


def train_step(module, optimizer, input_ids) -> float:
    loss = loss_of(module, input_ids)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


DECAYS = ("constant", "cosine")


def lr_factor(step: int, steps: int, warmup: int, decay: str) -> float:
    """The learning rate's multiplier before optimizer step `step` (0-based): linear warmup over `warmup`
    steps, then constant or a cosine down to 0 at `steps` (transformers' get_cosine_schedule_with_warmup)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if decay == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def scheduled(step: Callable, scheduler: torch.optim.lr_scheduler.LRScheduler) -> Callable:
    """`step` followed by one step of the learning-rate schedule."""
    def run(module, optimizer, input_ids) -> float:
        loss = step(module, optimizer, input_ids)
        scheduler.step()
        return loss
    return run


def tracked_memory(module: torch.nn.Module, optimizer: torch.optim.Optimizer, step: Callable, stream: Iterator,
                   losses: list[float], device: torch.device | str = "cpu") -> dict[str, int]:
    """MemTracker's peak by category over MEMORY_STEPS steps (the second one has optimizer state)."""
    from qgraph.memory import FrozenAwareMemTracker, peak_breakdown

    tracker = FrozenAwareMemTracker()
    tracker.track_external(module, optimizer)
    with tracker:
        for _ in range(MEMORY_STEPS):
            losses.append(step(module, optimizer, next(stream)))
            tracker.reset_mod_stats()
    return peak_breakdown(tracker, device)


def run_config(bench: Bench, config: str, steps: int, timing_steps: int, eval_blocks: int, batch_size: int,
               block_len: int, pte_path: Path | None = None, warmup: int = 0, decay: str = "constant",
               seed: int = SEED) -> Result:
    from qgraph.data import batches, token_blocks, train_heldout_split
    from qgraph.evaluate import perplexity
    from qgraph.memory import peak_rss_bytes, reset_peak_rss
    from qgraph.models import load_smollm2

    torch.manual_seed(seed)
    model, tokenizer = load_smollm2(progress=False)
    train_text, heldout_text = train_heldout_split()
    heldout = token_blocks(heldout_text, tokenizer, block_len)[:eval_blocks]
    result = Result(config, steps if config in bench.trained else 0,
                    settings=_settings(timing_steps, eval_blocks, batch_size, block_len, warmup, decay, seed))
    reset_peak_rss()
    module, optimizer = bench.build(config, model)
    precision = bench.autocast.get(config)
    with mixed_precision(precision):
        if optimizer is not None:
            stream = batches(token_blocks(train_text, tokenizer, block_len), batch_size, seed=seed, steps=steps)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, steps, warmup, decay))
            step = scheduled(train_step, schedule)
            module.train()
            result.memory = tracked_memory(module, optimizer, step, stream, result.losses)
            times = []
            for _ in range(timing_steps):
                start = time.perf_counter()
                result.losses.append(step(module, optimizer, next(stream)))
                times.append(time.perf_counter() - start)
            result.step_seconds = statistics.median(times)
            for input_ids in stream:
                result.losses.append(step(module, optimizer, input_ids))
            module.eval()
        result.peak_rss = peak_rss_bytes()
        result.perplexity = perplexity(lambda ids: logits_of(module, ids), heldout, progress=False)
    if precision is not None:
        result.float32_perplexity = perplexity(lambda ids: logits_of(module, ids), heldout, progress=False)
    deployed = bench.deployed(config, module) if bench.deployed is not None else None
    if deployed is not None:
        with mixed_precision(precision):
            result.deployed_perplexity = perplexity(lambda ids: logits_of(deployed, ids), heldout, progress=False)
        if pte_path is not None and bench.pte is not None:  # exported as it deploys, outside autocast
            figures = bench.pte(config, deployed, heldout, pte_path)
            result.pte = asdict(figures) if figures is not None else {}
    return result


def mixed_precision(dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast on the CPU in `dtype`, or nothing for None."""
    return contextlib.nullcontext() if dtype is None else torch.autocast("cpu", dtype=dtype)


# --- all configurations, side by side ---------------------------------------------------------------------


def run_in_subprocess(script: str, flags: list[str], json_path: Path, label: str, console: Console,
                      threads: int | None = None, show_status: bool = True) -> dict | None:
    """Run `script --json json_path *flags` in a fresh process (its own peak RSS), with `threads` torch threads
    when given; its result, or None with the error printed when it failed. show_status=False where the
    caller shows its own (rich allows one live display at a time)."""
    command = [sys.executable, script, "--json", str(json_path), *flags]
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    status = console.status(f"{label} in its own process") if show_status else contextlib.nullcontext()
    with status:
        completed = subprocess.run(command, capture_output=True, text=True, env=env)
    if completed.returncode:
        console.print(f"[red]{label} failed[/]\n{completed.stderr[-3000:]}")
        return None
    return json.loads(json_path.read_text())


def threads_per_job(jobs: int) -> int | None:
    """Torch threads for each of `jobs` processes run at once: the cores shared out (None: one job, torch's default)."""
    return None if jobs <= 1 else max(1, (os.cpu_count() or 1) // jobs)


def run_all(bench: Bench, args: argparse.Namespace, console: Console) -> list[Result]:
    """Every configuration of args.configs, `args.jobs` processes at a time, in args.configs' order; a configuration
    whose process failed has no result (its error is printed)."""
    args.out.mkdir(parents=True, exist_ok=True)
    wanted_settings = _settings(args.timing_steps, args.eval_blocks, args.batch_size, args.block_len, args.warmup,
                                args.decay, args.seed)
    done: dict[str, Result | None] = {}
    to_run = []
    for config in args.configs:
        steps = args.steps if config in bench.trained else 0
        json_path = args.out / f"{config}.json"
        if args.reuse and json_path.exists():
            done[config], why_not = reusable(json_path, {"steps": steps, **wanted_settings})
            if done[config] is not None:
                console.print(f"{config}: reused {json_path}")
                continue
            console.print(f"{config}: running it again: {why_not}")
        to_run.append((config, steps, json_path))
    threads = threads_per_job(args.jobs)
    running: set[str] = set()
    with console.status("") as status, ThreadPoolExecutor(max(1, args.jobs)) as pool:
        def run_one(config: str, steps: int, json_path: Path) -> None:
            label = f"{config}: {steps} steps"
            running.add(label)
            status.update(f"in their own processes: {', '.join(sorted(running))}")
            data = run_in_subprocess(bench.script, ["--run", config, *_shared_flags(args)], json_path, label,
                                     console, threads, show_status=False)
            running.discard(label)
            done[config] = Result(**data) if data is not None else None
            if done[config] is not None:
                console.print(f"{config}: done ({_summary(done[config])})")

        for future in [pool.submit(run_one, *job) for job in to_run]:
            future.result()
    results = [done[config] for config in args.configs if done.get(config) is not None]
    if args.timing_from is not None:
        for result in results:
            if note := _take_timing(result, args.timing_from / f"{result.config}.json", args):
                console.print(f"{result.config}: {note}")
    return results


class UnreadableResult(Exception):
    """A stored result that cannot be read back: its message names the file and what is wrong with it."""


def load_result(path: Path) -> Result:
    """The Result a configuration's process wrote to `path`, or UnreadableResult naming the file and why not
    (a truncated write, an empty object, keys of another version of Result)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UnreadableResult(f"{path} is unreadable ({error})") from error
    try:
        result = Result(**data)
    except TypeError as error:  # not a JSON object, or a key Result lacks or has no default for
        raise UnreadableResult(f"{path} is not a result ({error})") from error
    if not isinstance(result.steps, int) or not isinstance(result.settings, dict):  # what --reuse compares
        raise UnreadableResult(f"{path} is not a result (steps {result.steps!r}, settings {result.settings!r})")
    return result


def reusable(json_path: Path, wanted: Mapping[str, int | str]) -> tuple[Result | None, str]:
    """(the earlier result, "") when --reuse may take it, else (None, why it must run again): unreadable, or made
    before a flag this run sets existed (its value then is unknown). A result made with another value of a flag
    stops the command instead: it is a measurement a rerun would overwrite."""
    try:
        stored = load_result(json_path)
    except UnreadableResult as error:
        return None, str(error)
    ran = {"steps": stored.steps, **stored.settings}
    differ = [f"{k} {ran[k]}, not {v}" for k, v in wanted.items() if k in ran and ran[k] != v]
    if differ:
        raise SystemExit(f"--reuse: {json_path} ran with other flags ({'; '.join(differ)}); "
                         "delete it, run with its flags, or drop --reuse")
    unrecorded = [k for k in wanted if k not in ran]
    if unrecorded:
        return None, f"{json_path} records no {', '.join(unrecorded)} (made before those flags existed)"
    return stored, ""


def _take_timing(result: Result, path: Path, args: argparse.Namespace) -> str:
    """Memory, peak RSS and step time from a short run made apart (on a quiet machine), when there is one:
    long runs for perplexity can then share the cores without spoiling the timings. Returns "" when taken
    (or not wanted: an untrained configuration has no step), else why this run's own figures stay."""
    if not result.steps:
        return ""
    if not path.exists():
        return f"no {path}: memory, peak RSS and step time are this run's"
    try:
        timing = load_result(path)
    except UnreadableResult as error:
        return f"{error}: memory, peak RSS and step time are this run's"
    shape = {k: timing.settings.get(k) for k in ("batch_size", "block_len")}
    if shape != {"batch_size": args.batch_size, "block_len": args.block_len}:
        raise SystemExit(f"--timing-from: {path} ran with {shape}, not batch {args.batch_size} x {args.block_len}")
    result.memory, result.peak_rss, result.step_seconds = timing.memory, timing.peak_rss, timing.step_seconds
    result.timing_from = str(path)
    return ""


def _settings(timing_steps: int, eval_blocks: int, batch_size: int, block_len: int, warmup: int = 0,
              decay: str = "constant", seed: int = SEED) -> dict[str, int | str]:
    return {"timing_steps": timing_steps, "eval_blocks": eval_blocks, "batch_size": batch_size, "block_len": block_len,
            "warmup": warmup, "decay": decay, "seed": seed}


def _shared_flags(args: argparse.Namespace) -> list[str]:
    return ["--steps", str(args.steps), "--timing-steps", str(args.timing_steps), "--eval-blocks",
            str(args.eval_blocks), "--batch-size", str(args.batch_size), "--block-len", str(args.block_len),
            "--warmup", str(args.warmup), "--decay", args.decay, "--seed", str(args.seed),
            *(["--pte"] if getattr(args, "pte", False) else [])]


def _summary(result: Result) -> str:
    mem = result.memory.get("Total", 0) / 2**30
    deployed = f", deployed ppl {result.deployed_perplexity:.2f}" if result.deployed_perplexity else ""
    pte = result.pte
    if pte:
        deployed += (f", .pte {pte['file_bytes'] / 2**20:.1f} MiB, prefill {pte['prefill_ms']:.0f} ms, "
                     f"{_pte_parity(pte)} ({pte['note']})" if pte["file_bytes"] else f", .pte: {pte['note']}")
    return (f"tracked peak {mem:.2f} GiB, RSS {result.peak_rss / 2**30:.2f} GiB, step {result.step_seconds:.2f} s, "
            f"ppl {result.perplexity:.2f}{deployed}")


def _pte_parity(pte: Mapping) -> str:
    return f"max abs diff {pte['max_abs_diff']:.3g}, top-1 {pte['top1_agreement']:.1%}"


def _pte_cells(r: Result, peer: Result | None, against: str) -> str:
    """The .pte columns of a row: size, prefill, parity with the deployed module, and both as ratios against
    the row's peer when the peer has a .pte too; the note instead when no file was written."""
    pte = r.pte
    if not pte:
        return " - | - | - | - |"
    if not pte["file_bytes"]:  # none written or none run: why, in the parity cell
        note = pte["note"][:160].replace("|", "\\|")  # a bare | would end the markdown cell
        return f" - | - | {note} | - |"
    other = peer.pte if peer is not None and peer is not r else {}
    ratio = (f"{other['file_bytes'] / pte['file_bytes']:.2f}x smaller, {other['prefill_ms'] / pte['prefill_ms']:.2f}x "
             f"faster{against}" if other.get("file_bytes") else "-")
    return f" {pte['file_bytes'] / 2**20:.1f} | {pte['prefill_ms']:.0f} | {_pte_parity(pte)} | {ratio} |"


def markdown_table(results: list[Result], peer_name: str, peer_label: str,
                   pairs: Mapping[str, str] | None = None) -> str:
    """The results table. Ratios are against `peer_name`, or for a configuration in `pairs` against its own
    peer, named in the cell. The deployed-perplexity column appears only when some result measured one, and the
    .pte columns only when some result made one, so tables of tools without them read as before."""
    by_name = {r.config: r for r in results}
    pairs = pairs or {}
    with_deployed = any(r.deployed_perplexity for r in results)
    with_pte = any(r.pte for r in results)
    lines = ["| configuration | steps | tracked peak (GiB) | params+buffers | grads | opt state | activations+temp "
             f"| peak RSS (GiB) | step (s) | memory vs {peer_label} | time vs {peer_label} | held-out ppl |"
             + (" deployed ppl |" if with_deployed else "")
             + (" pte MiB | pte prefill (ms) | pte vs deployed | pte vs peer |" if with_pte else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if with_deployed else "")
             + ("---:|---:|---|---|" if with_pte else "")]
    for r in results:
        m = r.memory
        gib = lambda n: f"{n / 2**30:.2f}" if m else "-"  # noqa: E731
        peer = by_name.get(pairs.get(r.config, peer_name))
        against = f" (vs {peer.config})" if peer and r.config in pairs else ""
        mem_ratio = f"{peer.memory['Total'] / m['Total']:.2f}x less{against}" if peer and m and peer.memory else "-"
        time_ratio = (f"{peer.step_seconds / r.step_seconds:.2f}x faster{against}"
                      if peer and r.step_seconds and peer.step_seconds else "-")
        deployed = (f" {r.deployed_perplexity:.2f} |" if r.deployed_perplexity else " - |") if with_deployed else ""
        float32 = f" (float32: {r.float32_perplexity:.2f})" if r.float32_perplexity else ""
        lines.append(
            f"| {r.config} | {r.steps} | {gib(m.get('Total', 0))} | {gib(m.get('Parameter', 0) + m.get('Buffer', 0))} "
            f"| {gib(m.get('Gradient', 0))} | {gib(m.get('Optstate', 0))} | {gib(m.get('Activation', 0) + m.get('Temp', 0))} "
            f"| {r.peak_rss / 2**30:.2f} | {f'{r.step_seconds:.2f}' if r.step_seconds else '-'} | {mem_ratio} | {time_ratio} "
            f"| {r.perplexity:.2f}{float32} |{deployed}" + (_pte_cells(r, peer, against) if with_pte else ""))
    return "\n".join(lines) + "\n"


def chart(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in results if r.memory]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    bottom = [0.0] * len(trained)
    for category in CATEGORIES:
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


def moving_average(values: list[float], window: int) -> list[float]:
    """The mean of each value with up to window - 1 before it: a training loss curve without its batch noise."""
    sums = [0.0]
    for v in values:
        sums.append(sums[-1] + v)
    starts = [max(0, i + 1 - window) for i in range(len(values))]
    return [(sums[i + 1] - sums[start]) / (i + 1 - start) for i, start in enumerate(starts)]


def loss_curves(curves: Mapping[str, list[float]], path: Path, window: int = 10) -> None:
    """Training losses per step side by side (moving average over `window` steps), one line per run, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, losses in curves.items():
        if losses:
            ax.plot(range(1, len(losses) + 1), moving_average(losses, window), label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (mean of the last {window} steps)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- the command line ------------------------------------------------------------------------------------


def int_at_least(minimum: int, why: str = "") -> Callable[[str], int]:
    """An argparse type: an integer of at least `minimum`, else a usage error (exit 2) naming the bound and `why`.
    A count of 0 or below otherwise fails late and elsewhere (a median of no timed steps, an empty table)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}{f' ({why})' if why else ''}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
# the next-token loss of a block of one token has no target: it is NaN, and training stops on it
sequence_length = int_at_least(2, "one token leaves nothing to predict")
# a batch size or length of a tool whose first batch is also its capture example: capture refuses a batch or
# sequence of 1, which the graph would otherwise take as a constant
capture_example_size = int_at_least(2, "the first batch is the example the model is captured with, which needs 2 "
                                       "rows and 2 tokens")


def earlier_runs_dir(text: str) -> Path:
    """An argparse type: the directory of earlier runs' CONFIG.json files, which must exist: a mistyped one would
    otherwise be read as holding none, without a word."""
    path = Path(text).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} {'is not a directory' if path.exists() else 'does not exist'}; "
                                         "give the directory the earlier runs wrote their CONFIG.json files to")
    return path


def plan_name(text: str) -> str:
    """An argparse type: a plan transform knows, checked before any model loads (the loading takes seconds to
    minutes; the name, none)."""
    from qgraph.errors import PlanError
    from qgraph.plans import get_plan

    try:
        get_plan(text)
    except PlanError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def check_writable(parser: argparse.ArgumentParser, path: Path, flag: str, directory: bool = True) -> None:
    """A usage error (exit 2) unless `path` can be written (as a directory, or a file): checked when the flags are
    read, not when the results are, after the runs that made them."""
    from qgraph.errors import QGraphError
    from qgraph.paths import check_output_dir, check_output_file

    try:
        (check_output_dir if directory else check_output_file)(path, flag)
    except QGraphError as error:
        parser.error(str(error))


def write_json(path: Path, data: object) -> None:
    """`data` as JSON at `path`, whole or not at all: written to a temporary file beside it, then moved over it,
    so a run killed mid-write never leaves a truncated file for --reuse to find."""
    path.parent.mkdir(parents=True, exist_ok=True)  # check_writable lets a new directory through
    temporary = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                            delete=False)
    try:
        with temporary:
            json.dump(data, temporary, indent=2)
        os.replace(temporary.name, path)
    except BaseException:
        Path(temporary.name).unlink(missing_ok=True)
        raise


def exit_if_failed(wanted: Sequence[str], ran: Collection[str], out: Path) -> None:
    """Exit non-zero naming the configurations of `wanted` that have no result (their process failed; each error
    is printed above it): a table that lacks rows must not pass for a finished benchmark. The results of `ran` were
    written to `out`; when there are none, nothing was, and `out` keeps its earlier results."""
    failed = [config for config in wanted if config not in ran]
    if not failed:
        return
    outcome = (f"the other {len(wanted) - len(failed)} written to {out}/" if ran
               else f"nothing written: {out}/ keeps its earlier results")
    raise SystemExit(f"{len(failed)} of {len(wanted)} configurations failed: {', '.join(failed)} (errors above); "
                     f"{outcome}")


def main(bench: Bench, argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=bench.doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", choices=bench.configs, help="run one configuration in this process")
    parser.add_argument("--json", type=Path, help="with --run: where to write its result")
    parser.add_argument("--configs", nargs="+", default=list(bench.default_configs or bench.configs),
                        choices=bench.configs)
    parser.add_argument("--steps", type=positive_int, default=200)
    parser.add_argument("--timing-steps", type=positive_int, default=3)
    parser.add_argument("--eval-blocks", type=positive_int, default=56, help="held-out blocks (56 is the whole split)")
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--block-len", type=sequence_length, default=256)
    parser.add_argument("--warmup", type=int_at_least(0), default=0,
                        help="steps of linear learning-rate warmup (every configuration)")
    parser.add_argument("--decay", choices=DECAYS, default="constant",
                        help="the learning rate after warmup: constant, or a cosine down to 0 at the last step")
    parser.add_argument("--seed", type=int, default=SEED,
                        help="the batches' order and torch's global RNG (every configuration): runs at several seeds "
                             "give the spread a difference between configurations must beat")
    parser.add_argument("--jobs", type=positive_int, default=1,
                        help="configurations run at once, each in its own process with its share of the cores "
                             "(perplexity runs side by side; take step times from quiet runs, --timing-from)")
    parser.add_argument("--out", type=Path, default=bench.default_out)
    parser.add_argument("--timing-from", type=earlier_runs_dir, metavar="DIR",
                        help="take memory, peak RSS and step time from DIR/CONFIG.json (short runs made on a quiet "
                             "machine) and perplexity from this run")
    parser.add_argument("--reuse", action="store_true",
                        help="load a configuration's result from OUT/CONFIG.json when it exists (a long run "
                             "resumed, or configurations run apart with --run); it fails on one run with other flags, "
                             "and runs again one that is unreadable or records fewer flags")
    if bench.pte is not None:
        parser.add_argument("--pte", action="store_true",
                            help="also write each deployed form that has one as OUT/CONFIG.pte (ExecuTorch) and "
                                 "measure its size, prefill latency and logits against the deployed module "
                                 "(minutes per export)")
    args = parser.parse_args(argv)
    if args.steps < MEMORY_STEPS + args.timing_steps:
        parser.error(f"--steps must be at least {MEMORY_STEPS + args.timing_steps} "
                     f"({MEMORY_STEPS} measured for memory, then the timed ones)")
    if args.run:
        if args.json is None:
            parser.error("--run needs --json FILE (where to write the result)")
        check_writable(parser, args.json, "--json", directory=False)
        pte_path = args.json.with_suffix(".pte") if getattr(args, "pte", False) else None
        result = run_config(bench, args.run, args.steps, args.timing_steps, args.eval_blocks, args.batch_size,
                            args.block_len, pte_path, warmup=args.warmup, decay=args.decay, seed=args.seed)
        write_json(args.json, asdict(result))
        return
    check_writable(parser, args.out, "--out")
    console = Console()
    results = run_all(bench, args, console)
    if results:  # none: the earlier results.* stay as they were
        write_json(args.out / "results.json", [asdict(r) for r in results])
        table = markdown_table(results, bench.peer, bench.peer_label, bench.pairs)
        (args.out / "results.md").write_text(table)
        chart(results, args.out / "memory_time.png")
        loss_curves({r.config: r.losses for r in results if r.losses}, args.out / "losses.png")
        console.print(table)
        console.print(f"written to {args.out}/ (results.json, results.md, memory_time.png, losses.png)")
    exit_if_failed(args.configs, {r.config for r in results}, args.out)
