"""Export SmolLM2-135M to every deployment target and measure each artifact in its own runtime.

Per target: export time (write + the export's own fresh-process check), file size, load time and
prefill latency (1 x 128 tokens) in a fresh process running the artifact's runtime alone, and the
next-token latency, next to the PyTorch finalized module and the fp32 model measured in this process.
The artifacts take no KV cache yet: a next token is a forward over the prompt plus one token, so it is
reported as such (prompt + 1), not as a cached decode step.

    python tools/bench_export.py [--plan lrqat-w4] [--targets pt2 aoti onnx gguf gguf:llama.cpp] [--repeats 5]
    python tools/bench_export.py --plan lrqat-w4a8 --targets executorch

A target is a name or name:runtime for a target with a runtime option (gguf:llama.cpp checks and times the
GGUF file in llama.cpp instead of transformers' GGUF reader; the default adds it when llama-cpp-python is
installed). Each artifact is timed with the runner, arguments and qgraph visibility its export check used.

Writes out/bench_export/results.json and results.md; prints the table.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

import qgraph
from benchlib import check_writable, plan_name, positive_int, write_json
from qgraph.errors import ExportError
from qgraph.export.check import CheckCase, run_in_runtime
from qgraph.models import load_smollm2
from qgraph.report import format_bytes

PREFILL = 128


@dataclass
class Row:
    name: str
    file_bytes: int | None = None
    export_seconds: float | None = None
    load_seconds: float | None = None
    prefill_ms: float | None = None
    next_token_ms: float | None = None
    max_abs_diff: float | None = None
    top1_agreement: float | None = None
    note: str = ""


def latency_cases(vocab: int, repeats: int) -> list[CheckCase]:
    """`repeats` prefills of PREFILL tokens, then `repeats` of PREFILL + 1 (the next token, uncached)."""
    generator = torch.Generator().manual_seed(0)
    cases = []
    for length in (PREFILL, PREFILL + 1):
        for _ in range(repeats):
            ids = torch.randint(3, vocab, (1, length), generator=generator)
            cases.append(CheckCase(ids, torch.ones_like(ids)))
    return cases


def in_process_latency(forward, cases: list[CheckCase], repeats: int) -> tuple[float, float]:
    seconds = []
    with torch.no_grad():
        forward(cases[0].input_ids, cases[0].attention_mask)  # warm-up
        for case in cases:
            start = time.perf_counter()
            forward(case.input_ids, case.attention_mask)
            seconds.append(time.perf_counter() - start)
    return medians_ms(seconds, repeats)


def medians_ms(seconds: list[float], repeats: int) -> tuple[float, float]:
    # the first run of each length in a fresh process includes one-time work: drop it when there is more
    prefill, next_token = seconds[:repeats], seconds[repeats:]
    trim = 1 if repeats > 2 else 0
    return 1e3 * statistics.median(prefill[trim:]), 1e3 * statistics.median(next_token[trim:])


def default_targets() -> list[str]:
    llama_cpp = ["gguf:llama.cpp"] if importlib.util.find_spec("llama_cpp") is not None else []
    return [*qgraph.export.targets(), *llama_cpp]


def export_target(spec: str) -> str:
    """An argparse type: a target as NAME or NAME:RUNTIME, checked before the model loads and runs (a minute
    before the first export): get_target refuses an unknown name or a target whose packages are missing,
    target_options a runtime the target does not have."""
    name, _, runtime = spec.partition(":")
    try:
        target = qgraph.export.get_target(name)
        if runtime:
            qgraph.export.target_options(target, {"runtime": runtime})
    except ExportError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return spec


def bench_target(finalized: qgraph.QGraphModule, spec: str, out_dir: Path, cases: list[CheckCase], repeats: int,
                 tokenizer, console: Console) -> Row:
    name, _, runtime = spec.partition(":")
    target = qgraph.export.get_target(name)
    options = {"runtime": runtime} if runtime else {}
    if "max_seq_len" in target.option_names():  # a target with a length bound (ExecuTorch) must take the cases
        options["max_seq_len"] = PREFILL + 1
    stem = f"smollm2-{finalized.plan.name.removesuffix('+finalize')}-{spec.replace(':', '-').replace('.', '')}"
    try:
        report = qgraph.export.export_report(finalized, out_dir / f"{stem}{target.suffixes[0]}", format=name,
                                             console=console, **options,
                                             **qgraph.export.tokenizer_options(name, tokenizer))
    except ExportError as exc:
        return Row(spec, note=str(exc).splitlines()[0][:160])
    check = report.runtime
    result = run_in_runtime(check.runner, report.path, cases, extra_args=list(check.runner_args),
                            allow_qgraph=check.allow_qgraph)
    prefill, next_token = medians_ms(result.run_seconds, repeats)
    return Row(spec, report.file_bytes, report.export_seconds, result.load_seconds, prefill, next_token,
               report.parity.max_abs_diff, report.parity.top1_agreement, "; ".join(report.notes)[:160])


def table(rows: list[Row]) -> Table:
    out = Table(title=f"SmolLM2-135M artifacts (prefill 1x{PREFILL}; next token = 1x{PREFILL + 1}, no KV cache)")
    for column in ("artifact", "file", "export (s)", "load (s)", "prefill (ms)", "next token (ms)", "vs finalized",
                   "max |logits diff|", "top-1", "note"):
        out.add_column(column)
    baseline = next(r.prefill_ms for r in rows if r.name == "pytorch finalized")
    for r in rows:
        out.add_row(r.name, format_bytes(r.file_bytes) if r.file_bytes else "-", _num(r.export_seconds, ".1f"),
                    _num(r.load_seconds, ".2f"), _num(r.prefill_ms, ".0f"), _num(r.next_token_ms, ".0f"),
                    f"{baseline / r.prefill_ms:.2f}x faster" if r.prefill_ms else "-",
                    _num(r.max_abs_diff, ".1e"), _percent(r.top1_agreement), r.note)
    return out


def markdown(rows: list[Row]) -> str:
    lines = ["| artifact | file | export (s) | load (s) | prefill 1x128 (ms) | next token (ms) | max abs logits diff | top-1 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.name} | {format_bytes(r.file_bytes) if r.file_bytes else '-'} | {_num(r.export_seconds, '.1f')} "
                     f"| {_num(r.load_seconds, '.2f')} | {_num(r.prefill_ms, '.0f')} | {_num(r.next_token_ms, '.0f')} "
                     f"| {_num(r.max_abs_diff, '.1e')} | {_percent(r.top1_agreement)} |")
    return "\n".join(lines) + "\n"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", type=plan_name, default="lrqat-w4")
    parser.add_argument("--targets", nargs="+", type=export_target, default=default_targets())
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--out", type=Path, default=Path("out/bench_export"))
    args = parser.parse_args(argv)
    check_writable(parser, args.out, "--out")
    console = Console(width=200)
    args.out.mkdir(parents=True, exist_ok=True)

    model, tokenizer = load_smollm2()
    finalized = qgraph.finalize(qgraph.transform(model, args.plan))
    cases = latency_cases(int(model.config.vocab_size), args.repeats)
    fp32_ms = in_process_latency(lambda ids, mask: model(input_ids=ids, attention_mask=mask, use_cache=False),
                                 cases, args.repeats)
    fin_ms = in_process_latency(lambda ids, mask: finalized(input_ids=ids, attention_mask=mask), cases, args.repeats)
    rows = [Row("pytorch fp32 model", sum(p.numel() * 4 for p in model.parameters()), prefill_ms=fp32_ms[0],
                next_token_ms=fp32_ms[1], note="in this process"),
            Row("pytorch finalized", prefill_ms=fin_ms[0], next_token_ms=fin_ms[1], note="in this process (qgraph ops)")]
    for name in track(args.targets, description="exporting", console=console):
        rows.append(bench_target(finalized, name, args.out, cases, args.repeats, tokenizer, console))
    console.print(table(rows))
    write_json(args.out / "results.json", [asdict(r) for r in rows])
    (args.out / "results.md").write_text(markdown(rows))
    console.print(f"written to {args.out}/ (results.json, results.md)")


if __name__ == "__main__":
    main()
