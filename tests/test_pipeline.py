import io
from dataclasses import dataclass

import pytest
import torch
from rich.console import Console
from torch import fx, nn

import passes
import qgraph
from qgraph.capture import capture_info
from qgraph.graph import count_ops, linear_sites
from qgraph.pipeline import PassContext, PassResult, PassSpec, run_pipeline, verify
from qgraph.plans import PassConfig, Plan
from qgraph.report import PassReport

aten = torch.ops.aten
NF4 = torch.ops.qgraph.nf4_linear


@dataclass(frozen=True)
class NoOptions:
    pass


def wrong_shaped_weight(gm: fx.GraphModule, context: PassContext, options: NoOptions) -> PassResult:
    """A broken rewrite: the first linear's weight swapped for one with the wrong input width."""
    site = linear_sites(gm)[0]
    owner, _, attr = site.weight_name.rpartition(".")
    setattr(gm.get_submodule(owner), attr, nn.Parameter(torch.randn(site.out_features, site.in_features - 1)))
    return PassResult(gm, modified=True, report=PassReport("wrong_shaped_weight", {}))


def use_before_definition(gm: fx.GraphModule, context: PassContext, options: NoOptions) -> PassResult:
    """A broken rewrite: a node reading a value computed after it."""
    last_linear = linear_sites(gm)[-1].node
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        gm.graph.call_function(aten.relu.default, (last_linear,))
    return PassResult(gm, modified=True, report=PassReport("use_before_definition", {}))


WRONG_SHAPE = PassSpec("wrong_shaped_weight", wrong_shaped_weight, NoOptions, "breaks shapes")
USE_BEFORE_DEF = PassSpec("use_before_definition", use_before_definition, NoOptions, "breaks the graph")


def spy_spec(name: str, calls: list[str]) -> PassSpec:
    def run(gm, context, options):
        calls.append(name)
        return PassResult(gm, modified=False, report=PassReport(name, {}))
    return PassSpec(name, run, NoOptions, "records that it ran")


def mlp() -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))


# --- verify after each pass ------------------------------------------------------------------------------


def test_shape_breaking_pass_fails_verification_naming_it(tiny_llama):
    gm = qgraph.capture(tiny_llama)
    context = PassContext(example_inputs=capture_info(gm).example_inputs)
    calls: list[str] = []
    steps = [(WRONG_SHAPE, NoOptions()), (spy_spec("after", calls), NoOptions())]
    with pytest.raises(qgraph.VerificationError) as err:
        run_pipeline(gm, steps, context)
    assert "shapes do not check after pass 'wrong_shaped_weight'" in str(err.value)
    assert calls == []  # the pipeline stopped at the pass at fault


def test_malformed_graph_fails_verification_naming_the_pass():
    gm = qgraph.capture(mlp(), (torch.randn(2, 64),))
    context = PassContext(example_inputs=capture_info(gm).example_inputs)
    with pytest.raises(qgraph.VerificationError, match="graph is malformed after pass 'use_before_definition'"):
        run_pipeline(gm, [(USE_BEFORE_DEF, NoOptions())], context)


def test_transform_runs_verification_for_registered_passes(monkeypatch, snapshot):
    monkeypatch.setattr(passes, "ALL_PASSES", [*passes.ALL_PASSES, WRONG_SHAPE])
    model = mlp()
    before = snapshot(model)
    plan = Plan("broken", "", (PassConfig("wrong_shaped_weight"),))
    with pytest.raises(qgraph.VerificationError, match="'wrong_shaped_weight'"):
        qgraph.transform(model, plan, example_inputs=(torch.randn(2, 64),))
    before.assert_unchanged(model)  # the broken weight went into the capture, not the model


def test_verify_keeps_the_recorded_symbolic_shapes(llama_capture):
    _, gm = llama_capture
    recorded = {n: n.meta["val"] for n in gm.graph.nodes if "val" in n.meta}
    assert verify(gm, capture_info(gm).example_inputs, after="nothing") is True
    assert all(n.meta["val"] is val for n, val in recorded.items())
    ids_val = gm.graph.find_nodes(op="placeholder", target="input_ids")[0].meta["val"]
    assert all(isinstance(d, torch.SymInt) for d in ids_val.shape)


def test_verify_without_example_inputs_only_lints():
    model = mlp()
    gm = qgraph.capture(model)  # symbolic_trace: nothing to propagate
    assert verify(gm, {}, after="nothing") is False
    x = torch.randn(3, 64)
    expected = model(x)
    qm = qgraph.transform(mlp(), "nf4", include=("*",))
    assert qm.report["quantize_nf4"].notes == ["graph linted; shapes not checked (captured without example inputs)"]
    assert len(qm.report["quantize_nf4"].rewritten) == 2
    assert count_ops(qm.graph_module)[NF4] == 2
    with torch.no_grad():
        assert qm(x).shape == expected.shape
        assert 0 < (qm(x) - expected).abs().max() < 0.2 * expected.abs().max()


def test_pass_spec_option_names():
    spec = passes.get_pass("quantize_nf4")
    assert spec.option_names() == ["blocksize", "double_quant", "include", "exclude"]
    assert spec.name == "quantize_nf4" and spec.description


# --- skip, print-after, timing -------------------------------------------------------------------------


def test_run_pipeline_skips_by_name():
    gm = qgraph.capture(mlp(), (torch.randn(2, 64),))
    calls: list[str] = []
    steps = [(spy_spec("a", calls), NoOptions()), (spy_spec("b", calls), NoOptions()),
             (spy_spec("c", calls), NoOptions())]
    _, reports = run_pipeline(gm, steps, PassContext(capture_info(gm).example_inputs), skip=["b"])
    assert calls == ["a", "c"]
    assert [(r.name, r.ran) for r in reports] == [("a", True), ("b", False), ("c", True)]


def test_transform_skip_by_name_rewrites_nothing(tiny_llama, make_ids):
    qm = qgraph.transform(tiny_llama, "nf4", skip=["quantize_nf4"])
    report = qm.report["quantize_nf4"]
    assert report.ran is False
    assert report.records == [] and report.matched == 0 and report.seconds == 0.0
    assert report.options == {"blocksize": 64, "double_quant": True, "include": None, "exclude": ()}
    counts = count_ops(qm.graph_module)
    assert NF4 not in counts and counts[aten.linear] == 15
    assert "skipped by name" in str(qm.report)
    ids = make_ids((2, 5))
    with torch.no_grad():
        assert torch.equal(qm(input_ids=ids).logits, tiny_llama(input_ids=ids, use_cache=False).logits)


def test_print_after_prints_the_rewritten_graph_code(tiny_llama):
    buffer = io.StringIO()
    qm = qgraph.transform(tiny_llama, "nf4", print_after=["quantize_nf4"],
                          console=Console(file=buffer, width=10_000, no_color=True))
    text = buffer.getvalue()
    assert text.startswith("// ----- graph after quantize_nf4 -----\n")
    assert "def forward(self, input_ids, attention_mask, use_cache):" in text
    assert text.count("torch.ops.qgraph.nf4_linear.default(") == 14
    assert text.count("torch.ops.aten.linear.default(") == 1
    assert qm.graph_module.code.count("torch.ops.qgraph.nf4_linear.default(") == 14


def test_no_print_after_prints_nothing():
    buffer = io.StringIO()
    qgraph.transform(nn.Sequential(nn.Linear(64, 64)), "nf4", console=Console(file=buffer))
    assert buffer.getvalue() == ""


def test_print_after_prints_the_code_verbatim():
    buffer = io.StringIO()
    qm = qgraph.transform(mlp(), "nf4", include=("*",), example_inputs=(torch.randn(2, 64),),
                          print_after=["quantize_nf4"], console=Console(file=buffer, width=10_000, no_color=True))
    code = qm.graph_module.code
    assert "[" in code
    for line in code.splitlines():
        assert line in buffer.getvalue().splitlines()


def test_timing_is_recorded(llama_nf4):
    _, qm = llama_nf4
    assert qm.report["quantize_nf4"].seconds > 0
    assert qm.report.capture_seconds > 0
    assert qm.report.plan == "nf4"
    with pytest.raises(KeyError, match="no pass 'nope'"):
        qm.report["nope"]
