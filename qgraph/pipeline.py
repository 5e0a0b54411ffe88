"""The pass pipeline: run passes in order, verify after each, time them, collect their reports.

A pass is a plain function `(GraphModule, PassContext, options) -> PassResult` registered with a name
and an options dataclass (`PassSpec`). After every pass the graph is linted and shape-checked by
propagating FakeTensors of the example inputs (MLIR-style verify-after-each-pass), so a broken
rewrite fails at the pass that broke it, not at the first forward.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, TypeVar

import torch
from rich.console import Console
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from qgraph.errors import VerificationError
from qgraph.report import PassReport

T = TypeVar("T")


@dataclass
class PassContext:
    """What passes may read besides the graph: the example inputs (by placeholder name) and the
    parameters later stages must train (pass name -> qualified names)."""

    example_inputs: dict[str, Any]
    trainable: dict[str, list[str]] = field(default_factory=dict)
    # What passes made for one graph of a model, by key, for a second graph of the same model to take as
    # it is (qgraph.decode runs the plan again on the KV-cached graph): shared, both graphs hold the same
    # tensors and modules, and the second run quantizes and searches nothing again.
    made: dict[Any, Any] = field(default_factory=dict)
    # The tensors a cast copy's attributes were cast from, by qualified name (transform(dtype=), qgraph.cast):
    # a pass that quantizes a weight reads it here, at the precision it had, and the graph computes in the cast.
    sources: dict[str, torch.Tensor] = field(default_factory=dict)

    def make_once(self, key: Any, make: Callable[[], T]) -> T:
        """`make()`, or what it returned when a pass sharing `made` asked under the same key."""
        if key not in self.made:
            self.made[key] = make()
        return self.made[key]


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    report: PassReport


@dataclass(frozen=True)
class PassSpec:
    name: str
    run: Callable[[fx.GraphModule, PassContext, Any], PassResult]
    options_type: type
    description: str

    def option_names(self) -> list[str]:
        return [f.name for f in fields(self.options_type)]


def options_dict(options: Any) -> dict[str, Any]:
    return asdict(options) if is_dataclass(options) else {}


def run_pipeline(
    gm: fx.GraphModule,
    steps: Sequence[tuple[PassSpec, Any]],
    context: PassContext,
    *,
    skip: Sequence[str] = (),
    print_after: Sequence[str] = (),
    console: Console | None = None,
) -> tuple[fx.GraphModule, list[PassReport]]:
    reports = []
    for spec, options in steps:
        if spec.name in skip:
            reports.append(PassReport(spec.name, options_dict(options), ran=False))
            continue
        start = time.perf_counter()
        result = spec.run(gm, context, options)
        gm = result.graph_module
        # verified whatever the pass says it did: the check must not rest on the pass's own word
        if not verify(gm, context.example_inputs, after=spec.name):
            result.report.notes.append("graph linted; shapes not checked (captured without example inputs)")
        result.report.seconds = time.perf_counter() - start
        reports.append(result.report)
        if spec.name in print_after:
            # verbatim: graph code is full of [a, b] lists that rich would read as markup
            (console or Console()).print(f"// ----- graph after {spec.name} -----\n{gm.code}",
                                         markup=False, highlight=False, soft_wrap=True)
    return gm, reports


def verify(gm: fx.GraphModule, example_inputs: dict[str, Any], *, after: str) -> bool:
    """Lint the graph and propagate fake example inputs through it; raise naming the pass at fault.

    Returns whether shapes were checked (they cannot be without an example for every input)."""
    try:
        gm.graph.lint()
        gm.recompile()
    except Exception as exc:
        raise VerificationError(f"graph is malformed after pass {after!r}: {exc}") from exc
    placeholders = [n.target for n in gm.graph.find_nodes(op="placeholder")]
    if any(name not in example_inputs for name in placeholders):
        return False
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    args = [_fake(mode, example_inputs[name]) for name in placeholders]
    # keep the symbolic shapes export recorded; nodes a pass added get the propagated ones
    recorded = {node: node.meta["val"] for node in gm.graph.nodes if "val" in node.meta}
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*args)
    except Exception as exc:
        raise VerificationError(f"shapes do not check after pass {after!r}: {type(exc).__name__}: {exc}") from exc
    finally:
        for node, val in recorded.items():
            node.meta["val"] = val
    return True


def _fake(mode: FakeTensorMode, value: Any) -> Any:
    return mode.from_tensor(value) if isinstance(value, torch.Tensor) else value
