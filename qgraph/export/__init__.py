"""`qgraph.export(module, path)`: a transformed or finalized model as a file its deployment runtime runs.

One target per file in this package (pt2, aoti, onnx, gguf, executorch), each an `ExportTarget`: what it
cannot express, a writer, and a runner script that loads the artifact in the target's own runtime. Export
checks the module against the target before it writes anything, writes into a temporary name, runs the
artifact in a fresh process (without qgraph) on check batches of two shapes with right padding, and moves
the file into place only when its logits match the PyTorch module's within the target's tolerance: an
artifact nobody ran is not exported.

This package is itself callable: `qgraph.export(module, path)` is `qgraph.export.export(module, path)`.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_type_hints

import torch
from rich.console import Console

from qgraph.capture import example_kwargs
from qgraph.errors import ExportError, unknown_name_message
from qgraph.export.check import (CheckCase, check_cases, compare, reference_logits, rounding_floor,
                                 run_in_runtime)
from qgraph.export.program import check_exportable, deployable, fp32_bytes
from qgraph.export.report import ExportReport
from qgraph.export.target import Artifact, ExportTarget
from qgraph.module import QGraphModule

# target name -> the module of this package that defines its TARGET; imported on use, since each pulls in
# its runtime's packages (onnx, gguf, executorch) and those are optional
TARGET_MODULES = {
    "pt2": "qgraph.export.pt2",
    "aoti": "qgraph.export.aoti",
    "onnx": "qgraph.export.onnx",
    "gguf": "qgraph.export.gguf",
    "executorch": "qgraph.export.executorch",
}
# the target a file suffix means when no format is given (AOTInductor packages are .pt2 too: format="aoti")
SUFFIX_TARGETS = {".pt2": "pt2", ".onnx": "onnx", ".gguf": "gguf", ".pte": "executorch"}


@dataclass(frozen=True)
class ExportJob:
    """What a target's writer is given: the finalized module, where to write, its options, the example
    inputs a trace should use."""

    module: QGraphModule
    path: Path
    options: Any
    example_inputs: dict[str, torch.Tensor]


DECODE_OPTION = "decode"  # the option of the targets that write the KV-cache signature (qgraph.decode)


def targets() -> list[str]:
    return list(TARGET_MODULES)


def get_target(name: str) -> ExportTarget:
    name = name.lower() if isinstance(name, str) else name  # as suffixes are read: "PT2" is pt2
    if name not in TARGET_MODULES:
        raise ExportError(unknown_name_message("export format", name, TARGET_MODULES))
    try:
        module = importlib.import_module(TARGET_MODULES[name])
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("qgraph"):
            raise ExportError(f"the {name} target is not part of this qgraph build") from exc
        extra = "executorch" if name == "executorch" else "export"
        raise ExportError(f"the {name} target needs the package {exc.name!r}, which is not installed; "
                          f"install qgraph's {extra} extra: pip install -e '.[{extra}]'") from exc
    return module.TARGET


def resolve_target(path: Path, format: str | None) -> ExportTarget:
    if format is not None:
        return get_target(format)
    suffix = path.suffix.lower()
    if suffix not in SUFFIX_TARGETS:
        known = ", ".join(f"{s} ({t})" for s, t in SUFFIX_TARGETS.items())
        raise ExportError(f"cannot tell the export format from {path.name!r}; name the file with one of {known}, "
                          f"or pass format= (one of {', '.join(TARGET_MODULES)})")
    return get_target(SUFFIX_TARGETS[suffix])


def target_options(target: ExportTarget, options: dict[str, Any]) -> Any:
    unknown = [key for key in options if key not in target.option_names()]
    if unknown:
        raise ExportError(unknown_name_message(f"{target.name} option", unknown[0], target.option_names())
                          if target.option_names() else f"the {target.name} target takes no options; got {unknown}")
    try:
        resolved = target.options_type(**options)
        check_flag_types(resolved)
    except (TypeError, ValueError) as exc:
        raise ExportError(f"{target.name} target: {exc}") from exc
    return resolved


def check_flag_types(options: Any) -> None:
    """A target option typed bool takes True or False (and None where its type allows): decode="no" is truthy,
    and would have written the decode signature."""
    for name, hint in get_type_hints(type(options)).items():
        value = getattr(options, name)
        kinds = set(get_args(hint)) or {hint}
        optional = type(None) in kinds
        is_flag = bool in kinds and kinds <= {bool, type(None)}
        if is_flag and not (isinstance(value, bool) or (optional and value is None)):
            raise TypeError(f"{name} must be True or False{' (or None)' if optional else ''}, got {value!r}")


def fitting_module(module: QGraphModule, target: ExportTarget, target_opts: Any) -> tuple[QGraphModule, list[str]]:
    """(the module as `target` writes it, finalized where it trains; notes), or an ExportError naming why the
    target cannot export it and the targets that can."""
    finalized, notes = deployable(module)
    why = target.unsupported(finalized, target_opts)
    if why is not None:
        others = [name for name in fitting_targets(finalized) if name != target.name]
        raise ExportError(f"the {target.name} target cannot export plan {finalized.plan.name!r}: {why}"
                          + (f" (targets that fit this module: {', '.join(others)})" if others else ""))
    return finalized, notes


def check_fits(module: QGraphModule, format: str, **options: Any) -> None:
    """Raise the ExportError `export(module, ..., format=format, **options)` would raise before writing, and
    write nothing: what a caller that trains before it exports asks first (`qgraph export --steps`)."""
    check_exportable(module)
    target = get_target(format)
    fitting_module(module, target, target_options(target, options))


def check_destination(path: Path) -> None:
    """Refuse, before the export runs, a path the artifact cannot be written to."""
    if path.is_dir():
        raise ExportError(f"{path} is a directory; name the file to write in it, e.g. {path / ('model' + path.suffix)}")


def tokenizer_options(format: str, tokenizer: Any) -> dict[str, Any]:
    """{"tokenizer": tokenizer} for a target whose file carries the tokenizer, else nothing: what a caller that
    holds a tokenizer (the demo, the CLI) passes to export for any format."""
    return {"tokenizer": tokenizer} if tokenizer is not None and get_target(format).takes_tokenizer else {}


def installed_targets() -> list[ExportTarget]:
    """The targets whose packages are installed (executorch's is an extra)."""
    installed = []
    for name in TARGET_MODULES:
        try:
            installed.append(get_target(name))
        except ExportError:
            continue
    return installed


def fitting_targets(module: QGraphModule) -> list[str]:
    """The targets (installed ones) that can express this finalized module with their default options."""
    return [target.name for target in installed_targets() if target.unsupported(module, target.options_type()) is None]


def check_decode_formats(formats: list[str]) -> None:
    """Raise unless every one of `formats` can write the KV-cache signature (`decode=True`), naming those that can."""
    without = [name for name in formats if DECODE_OPTION not in get_target(name).option_names()]
    if without:
        takes = [target.name for target in installed_targets() if DECODE_OPTION in target.option_names()]
        raise ExportError(f"decode: {', '.join(without)} files take no KV cache (their runtimes keep their own, or "
                          f"none); the formats that write the KV-cache signature: {', '.join(takes)}")


def export(module: QGraphModule, path: str | os.PathLike, *, format: str | None = None,
           example_inputs: Any = None, console: Console | None = None, **options: Any) -> Path:
    """Write `module` (what transform or finalize returned) to `path` for a deployment runtime; returns the path.

    The format comes from the suffix (.pt2 .onnx .gguf .pte) or `format` ("aoti" for an AOTInductor
    package). A trainable LR-QAT/PEQA/RTN module is finalized first. Everything is checked before anything
    is written; the artifact is run by its own runtime in a fresh process and its logits compared with the
    module's, and the report (what each op became, size, parity) is printed to `console`.
    """
    return export_report(module, path, format=format, example_inputs=example_inputs, console=console,
                         **options).path


def export_report(module: QGraphModule, path: str | os.PathLike, *, format: str | None = None,
                  example_inputs: Any = None, console: Console | None = None, **options: Any) -> ExportReport:
    """`export`, returning its report."""
    path = Path(path).absolute()  # the runtime check runs in another working directory
    check_exportable(module)
    target = resolve_target(path, format)
    check_destination(path)
    target_opts = target_options(target, options)
    finalized, notes = fitting_module(module, target, target_opts)
    cases = check_cases(int(finalized.info.config.vocab_size))
    example = _example_inputs(finalized, example_inputs)
    if example_inputs is not None:
        cases.append(CheckCase(example["input_ids"], example["attention_mask"]))
    expected = reference_logits(finalized, cases)
    floor = rounding_floor(finalized, cases, expected)

    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as scratch:
        staged = Path(scratch) / path.name
        artifact = target.write(ExportJob(finalized, staged, target_opts, example))
        export_seconds = time.perf_counter() - start
        runtime = target.runtime_check(artifact, target_opts)
        result = run_in_runtime(runtime.runner, staged, cases, extra_args=list(runtime.runner_args),
                                allow_qgraph=runtime.allow_qgraph)
        parity = compare(expected, result.logits, cases, floor)
        allowed = parity.allowed(runtime.tolerance, runtime.relative_tolerance)
        if parity.max_abs_diff > allowed:
            raise ExportError(
                f"{target.name}: the runtime's logits differ from the PyTorch module's by up to "
                f"{parity.max_abs_diff:.3g} (tolerance {allowed:.3g}; logits range {parity.logits_range:.3g}; the "
                f"module against itself with its weights one ulp off: {parity.rounding_floor:.3g}; top-1 agreement "
                f"{parity.top1_agreement:.1%}); nothing was written"
                + "".join(f"\n  {note}" for note in artifact.notes))
        files = [staged, *artifact.extra_files]
        file_bytes = sum(f.stat().st_size for f in files)
        for file in files:  # into place only now that the runtime has run it
            os.replace(file, path.parent / file.name)
    report = ExportReport(target.name, path, finalized.plan.name, file_bytes, fp32_bytes(finalized),
                          artifact.op_mapping, parity, allowed, export_seconds, result.load_seconds,
                          result.run_seconds, runtime, [*notes, *artifact.notes])
    (console or Console()).print(report)
    return report


def _example_inputs(module: QGraphModule, example_inputs: Any) -> dict[str, torch.Tensor]:
    """The module's own examples, or the caller's checked as capture checks them (batch and length >= 2, integer
    dtypes taken as int64): a batch-1 example or an int32 mask failed inside torch.export or ONNX's exporter."""
    if example_inputs is None:
        return {name: module.info.example_inputs[name] for name in ("input_ids", "attention_mask")}
    return example_kwargs(example_inputs)


class _CallableModule(types.ModuleType):
    """`qgraph.export` is this package and its entry point at once: calling it exports."""

    def __call__(self, module: QGraphModule, path: str | os.PathLike, **kwargs: Any) -> Path:
        return export(module, path, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["Artifact", "ExportJob", "ExportReport", "ExportTarget", "export", "export_report", "get_target",
           "targets", "tokenizer_options"]
