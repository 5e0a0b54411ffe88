"""The `qgraph` command: plans, inspect, demo."""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from qgraph.errors import PlanError, QGraphError
from qgraph.paths import check_output_dir, check_output_file

# the main job: LR-QAT int4 (RTN at step 0), a short training run, then finalize and export
DEFAULT_PLAN, DEFAULT_STEPS = "lrqat-w4", 10
# transform's keywords the CLI sets itself, with the flag that sets each (None: none does)
CLI_SET_KEYWORDS = {"console": None, "skip": "--skip", "print_after": "--print-after"}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # reports are wide tables: outside a terminal rich would fold them to 80 columns
    console = Console() if sys.stdout.isatty() else Console(width=132)
    try:
        return args.run(args, console)
    except (QGraphError, ValueError) as exc:
        console.print(f"[bold red]error:[/] {exc}")
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qgraph", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    plans = commands.add_parser("plans", help="list the built-in plans")
    plans.add_argument("--json", action="store_true", help="print each plan as JSON")
    plans.set_defaults(run=_plans)

    inspect = commands.add_parser("inspect", help="transform a model and show what each pass did")
    inspect.add_argument("model", help="smollm2, tiny-llama / tiny-gpt2 / ..., or a local Hugging Face directory")
    inspect.add_argument("--plan", default="nf4")
    inspect.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                         help="override a plan option, e.g. --set blocksize=128 (repeatable)")
    inspect.add_argument("--dot", type=Path, help="draw the rewritten graph (.dot, .svg or .png)")
    inspect.add_argument("--dot-depth", type=int, default=4,
                         help="module-path depth the drawing groups nodes by (0: every node)")
    inspect.add_argument("--print-after", action="append", default=[], metavar="PASS",
                         help="print the graph after this pass")
    inspect.add_argument("--skip", action="append", default=[], metavar="PASS", help="skip this pass")
    inspect.set_defaults(run=_inspect)

    demo = commands.add_parser("demo", help="the main job on the real SmolLM2-135M model: train, finalize, export")
    demo.add_argument("--plan", default=DEFAULT_PLAN)
    demo.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE")
    demo.add_argument("--eval-blocks", type=int, default=24, help="held-out blocks of --block-len tokens to score")
    demo.add_argument("--block-len", type=int, default=256)
    demo.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                      help="training steps (plans with trainable parameters; 0 for the others)")
    demo.add_argument("--batch-size", type=int, default=4)
    demo.add_argument("--out", type=Path, help="keep the exported files in this directory")
    demo.set_defaults(run=_demo)

    export = commands.add_parser("export", help="transform (or restore), train, finalize and export a model")
    export.add_argument("--model", default="smollm2", help="smollm2, tiny-llama / ..., or a local Hugging Face directory")
    export.add_argument("--plan", help=f"the plan to transform with ({DEFAULT_PLAN} unless --from is given)")
    export.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE")
    export.add_argument("--steps", type=int, default=0, help="training steps before the export")
    export.add_argument("--from", dest="from_dir", type=Path, metavar="ADAPTERS",
                        help="restore a run saved with qm.save_pretrained(ADAPTERS) instead of --plan")
    export.add_argument("--format", action="append", required=True, metavar="FORMAT",
                        help="pt2, aoti, onnx, gguf or executorch (repeatable)")
    export.add_argument("--out", type=Path, required=True, help="directory the files are written to")
    export.add_argument("--batch-size", type=int, default=4)
    export.add_argument("--block-len", type=int, default=256)
    export.add_argument("--decode", action="store_true",
                        help="write the KV-cache signature (pt2, aoti, onnx): past keys and values in, present out")
    export.set_defaults(run=_export)
    return parser


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """`k=v` strings to options; values are Python literals where they parse (ints, floats, tuples);
    dtype=NAME is transform's dtype, torch.NAME (dtype=bfloat16)."""
    options = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise QGraphError(f"--set takes OPTION=VALUE, got {pair!r}")
        try:
            options[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[key] = text
    if isinstance(options.get("dtype"), str):
        name = options["dtype"].removeprefix("torch.")
        if isinstance(getattr(torch, name, None), torch.dtype):
            options["dtype"] = getattr(torch, name)
    return options


def check_options(plan: str | None, options: dict[str, Any], flags: tuple[str, ...] = ()) -> None:
    """--set options as transform will take them, before the model loads: on the command line a wrong type
    (`--set kv_cache=no`) is the user's error, not a bug, so it is reported as one. `flags`: the keywords this
    command sets from its own flags."""
    for key, flag in CLI_SET_KEYWORDS.items():
        if key in options and (flag is None or flag in flags):
            raise PlanError(f"--set {key}=... is not an option here" + (f"; use {flag}" if flag else ""))
    if plan is None:
        return
    from qgraph.api import check_transform_options

    try:
        check_transform_options(plan, options)
    except TypeError as exc:
        raise PlanError(f"--set: {exc}") from exc


def _plans(args: argparse.Namespace, console: Console) -> int:
    from qgraph.plans import PLANS

    for name in sorted(PLANS):
        plan = PLANS[name]
        if args.json:
            console.print_json(plan.to_json())
        else:
            console.print(f"[bold cyan]{name:14}[/] {plan.description}")
    return 0


def _inspect(args: argparse.Namespace, console: Console) -> int:
    import qgraph
    from qgraph.drawing import check_picture_request, write_graph_picture
    from qgraph.models import resolve_model

    options = parse_options(args.set)
    check_options(args.plan, options, flags=("--skip", "--print-after"))  # before the model loads
    if args.dot:
        check_picture_request(args.dot, args.dot_depth)
        check_output_file(args.dot, "--dot")
    with console.status(f"loading {args.model}"):
        model, _ = resolve_model(args.model)
    with console.status(f"capturing and running plan {args.plan}"):
        qm = qgraph.transform(model, args.plan, print_after=args.print_after, skip=args.skip,
                              console=console, **options)
    console.print(qm.report)
    if args.dot:
        args.dot.parent.mkdir(parents=True, exist_ok=True)  # as --out's directories are made
        path = write_graph_picture(qm.graph_module, args.dot, depth=args.dot_depth)
        console.print(f"graph drawn to {path}")
    return 0


def _demo(args: argparse.Namespace, console: Console) -> int:
    from qgraph.demo import run_demo

    options = parse_options(args.set)
    check_options(args.plan, options)
    if args.out is not None:
        check_output_dir(args.out, "--out")
    run_demo(args.plan, options, eval_blocks=args.eval_blocks, block_len=args.block_len,
             steps=args.steps, batch_size=args.batch_size, console=console, out_dir=args.out)
    return 0


def _export(args: argparse.Namespace, console: Console) -> int:
    from qgraph.deploy import export_trained

    options = parse_options(args.set)
    plan = args.plan or (None if args.from_dir else DEFAULT_PLAN)
    check_options(None if args.from_dir else plan, options)  # with --from, export_trained refuses --plan / --set
    check_output_dir(args.out, "--out")
    reports = export_trained(args.model, plan=plan, formats=args.format, out_dir=args.out, steps=args.steps,
                             from_dir=args.from_dir, options=options, batch_size=args.batch_size,
                             block_len=args.block_len, decode=args.decode, console=console)
    for report in reports:
        console.print(f"wrote {report.path} ({report.target}, max |logits diff| {report.parity.max_abs_diff:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
