"""qgraph.export's checks before anything is written, and the fresh-process runtime check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rich.console import Console

import qgraph
from qgraph.export.check import (FLOOR_FACTOR, Parity, check_cases, compare, reference_logits, rounding_floor,
                                 run_in_runtime)
from qgraph.export.program import deployable, is_finalized
from qgraph.models import tiny_causal_lm
from qgraph.side_network import side_network
from tests.conftest import make_llama


@pytest.fixture(scope="module")
def lrqat_module() -> qgraph.QGraphModule:
    return qgraph.transform(make_llama(), "lrqat-w4")


def test_the_package_is_callable_and_lists_its_targets():
    assert callable(qgraph.export)
    assert qgraph.export.targets() == ["pt2", "aoti", "onnx", "gguf", "executorch"]


def test_an_unknown_suffix_names_the_suffixes_and_formats(lrqat_module, tmp_path):
    with pytest.raises(qgraph.ExportError, match=r"from 'model\.bin'.*\.pt2 \(pt2\).*\.onnx \(onnx\).*format="):
        qgraph.export(lrqat_module, tmp_path / "model.bin")
    assert not any(tmp_path.iterdir())


def test_an_unknown_format_lists_the_formats_closest_first(lrqat_module, tmp_path):
    with pytest.raises(qgraph.ExportError, match=r"unknown export format 'onx'; valid export formats \(closest first\): onnx"):
        qgraph.export(lrqat_module, tmp_path / "model.onnx", format="onx")


@pytest.mark.parametrize(("format", "options", "message"), [
    ("pt2", {"decode": "no"}, r"pt2 target: decode must be True or False, got 'no'"),
    ("onnx", {"external_data": "no"}, r"onnx target: external_data must be True or False \(or None\), got 'no'"),
    ("aoti", {"decode": 1}, "aoti target: decode must be True or False, got 1"),
])
def test_a_flag_option_takes_a_bool(lrqat_module, tmp_path, format, options, message):
    with pytest.raises(qgraph.ExportError, match=message):
        qgraph.export(lrqat_module, tmp_path / "model.bin", format=format, **options)
    assert not any(tmp_path.iterdir())


def test_a_directory_as_the_path_is_refused_before_the_export_runs(lrqat_module, tmp_path, monkeypatch):
    monkeypatch.setattr(qgraph.export, "deployable", lambda module: pytest.fail("the export ran"))
    (tmp_path / "out.pt2").mkdir()
    with pytest.raises(qgraph.ExportError, match=r"out\.pt2 is a directory; name the file to write in it, e\.g\. "
                                                 r".*out\.pt2/model\.pt2"):
        qgraph.export(lrqat_module, tmp_path / "out.pt2")


def test_a_format_is_read_without_case_as_suffixes_are():
    assert qgraph.export.get_target("PT2") is qgraph.export.get_target("pt2")


def test_export_takes_only_what_transform_returns(tmp_path):
    with pytest.raises(qgraph.ExportError, match="takes the module qgraph.transform or qgraph.finalize returned"):
        qgraph.export(make_llama(), tmp_path / "model.pt2")


def test_a_trainable_module_is_finalized_first_and_a_finalized_one_is_kept(lrqat_module):
    finalized, notes = deployable(lrqat_module)
    assert is_finalized(finalized) and not is_finalized(lrqat_module)
    assert "finalized first" in notes[0]
    again, notes = deployable(finalized)
    assert again is finalized and notes == []


def test_check_cases_have_two_shapes_and_right_padding():
    cases = check_cases(256)
    assert [tuple(c.input_ids.shape) for c in cases] == [(2, 12), (1, 7)]
    padded = cases[0].attention_mask[-1]
    assert padded.tolist() == [1] * 7 + [0] * 5
    assert all(int(c.input_ids.max()) < 256 for c in cases)


def test_compare_reads_only_real_positions():
    cases = check_cases(16)
    expected = [np.zeros((*c.input_ids.shape, 16), dtype=np.float32) for c in cases]
    actual = [e.copy() for e in expected]
    actual[0][-1, -1] = 100.0  # a padded position: ignored
    actual[1][0, 0, 3] = 0.5
    parity = compare(expected, actual, cases)
    assert parity.max_abs_diff == 0.5
    assert parity.positions == 12 + 7 + 7


class _Logits(torch.nn.Module):
    """A stand-in model: logits = embedding, or with `step` the embedding rounded to a grid of that step (a
    model whose output jumps where its input crosses a grid line, as lrqat-w4a8's int8 activations make it)."""

    def __init__(self, vocab: int, step: float | None = None):
        super().__init__()
        weights = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))
        if step is not None:  # every weight exactly between two grid lines: one ulp decides where it rounds
            weights = (torch.floor(weights / step) + 0.5) * step
        self.embedding = torch.nn.Parameter(weights)
        self.step = step

    def forward(self, input_ids, attention_mask):
        logits = self.embedding[input_ids]
        if self.step is not None:
            logits = torch.round(logits / self.step) * self.step
        return type("Output", (), {"logits": logits})()


def test_the_rounding_floor_is_near_zero_for_a_smooth_model_and_leaves_it_unchanged():
    cases = check_cases(16)
    model = _Logits(16)
    before = model.embedding.detach().clone()
    expected = reference_logits(model, cases)
    floor = rounding_floor(model, cases, expected)
    assert 0 < floor <= 2 * float(np.abs(np.concatenate([e.ravel() for e in expected])).max()) * 2 ** -23
    assert torch.equal(model.embedding, before)


def test_the_rounding_floor_sees_a_model_that_rounds_its_activations():
    cases = check_cases(16)
    model = _Logits(16, step=0.25)
    floor = rounding_floor(model, cases, reference_logits(model, cases))
    assert floor == pytest.approx(0.25)  # one ulp of input, one whole step of output


def test_the_tolerance_takes_the_largest_of_absolute_relative_and_floor():
    parity = Parity(max_abs_diff=1.0, logits_range=10.0, top1_agreement=1.0, positions=4, rounding_floor=0.3)
    assert parity.allowed(1e-4, 0.01) == pytest.approx(FLOOR_FACTOR * 0.3)
    assert parity.allowed(1e-4, 0.5) == pytest.approx(5.0)
    assert not Parity(1.0, 10.0, 1.0, 4, rounding_floor=0.0).within(1e-4, 0.01)


def _write_runner(path, body: str):
    path.write_text("import numpy as np\nfrom _protocol import serve\n" + body)
    return path


def test_the_runner_runs_in_a_fresh_process_without_qgraph(tmp_path):
    ok = _write_runner(tmp_path / "echo.py", (
        "def load(path, extra):\n    return int(open(path).read())\n"
        "def run(vocab, ids, mask):\n    return np.eye(vocab, dtype=np.float32)[ids]\n"
        "serve(load, run)\n"))
    # the runner finds _protocol beside it: copy it there as the package's runners do
    from qgraph.export.target import RUNNERS_DIR

    (tmp_path / "_protocol.py").write_text((RUNNERS_DIR / "_protocol.py").read_text())
    (tmp_path / "artifact").write_text("16")
    cases = check_cases(16)
    result = run_in_runtime(ok, tmp_path / "artifact", cases)
    assert np.array_equal(result.logits[0], np.eye(16, dtype=np.float32)[cases[0].input_ids.numpy()])

    blocked = _write_runner(tmp_path / "uses_qgraph.py", "import qgraph\n")
    with pytest.raises(qgraph.ExportError, match="qgraph is not importable here: the artifact must run without qgraph"):
        run_in_runtime(blocked, tmp_path / "artifact", cases)
    allowed = _write_runner(tmp_path / "uses_qgraph_allowed.py", (
        "import qgraph\nserve(lambda p, e: None, lambda s, ids, mask: np.zeros((*ids.shape, 2)))\n"))
    assert run_in_runtime(allowed, tmp_path / "artifact", cases, allow_qgraph=True).logits[1].shape == (1, 7, 2)


def test_a_relative_path_is_written_and_checked(lrqat_module, tmp_path, monkeypatch):
    # the runtime check runs in a scratch working directory: a relative path must still reach the runner
    monkeypatch.chdir(tmp_path)
    written = qgraph.export(lrqat_module, "out/model.pt2", console=Console(quiet=True))
    assert written == tmp_path / "out" / "model.pt2" and written.is_file()


def test_the_report_says_how_the_runtime_ran_the_artifact(lrqat_module, tmp_path):
    # what a benchmark reads to run the same artifact the same way again
    report = qgraph.export.export_report(lrqat_module, tmp_path / "m.pt2", console=Console(quiet=True))
    target = qgraph.export.get_target("pt2")
    assert report.runtime.runner == target.runner_path and report.runtime.runner_args == ()
    assert report.runtime.tolerance == target.tolerance and not report.runtime.allow_qgraph
    keep_ops = qgraph.export.export_report(lrqat_module, tmp_path / "k.pt2", keep_ops=True, console=Console(quiet=True))
    assert keep_ops.runtime.allow_qgraph  # the fused ops load only with qgraph imported


def test_only_targets_whose_files_carry_a_tokenizer_take_one():
    tokenizer = object()
    assert qgraph.export.tokenizer_options("gguf", tokenizer) == {"tokenizer": tokenizer}
    assert qgraph.export.tokenizer_options("onnx", tokenizer) == {}
    assert qgraph.export.tokenizer_options("gguf", None) == {}


@pytest.mark.parametrize("name", ["model.pt2", "m.onnx"])
def test_qsts_head_delta_reaches_the_exported_file(tmp_path, name):
    if name.endswith(".onnx"):
        pytest.importorskip("onnxruntime")
    qm = qgraph.transform(tiny_causal_lm("llama", layers=1), "qst-nf4", head_rank=4)
    with torch.no_grad():  # off its zero start, so that parity fails if the file lost it
        qm.graph_module.qst_head_delta.up.normal_(generator=torch.Generator().manual_seed(0))
    finalized = qgraph.finalize(qm)
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the file is checked against the finalized module, which must still add the delta
        torch.testing.assert_close(finalized(input_ids=ids).logits, qm(input_ids=ids).logits)
        without_delta = qgraph.finalize(qgraph.transform(tiny_causal_lm("llama", layers=1), "qst-nf4", head_rank=0))
        assert (finalized(input_ids=ids).logits - without_delta(input_ids=ids).logits).abs().max() > 1e-2
    report = qgraph.export.export_report(finalized, tmp_path / name, console=Console(quiet=True))
    # the runtime ran the file in a fresh process and its logits matched the finalized module's
    assert report.parity.max_abs_diff <= 1e-3 and report.parity.top1_agreement == 1.0


@pytest.mark.parametrize("name, format", [("model.pt2", "pt2"), ("m.onnx", "onnx")])
def test_a_qst_decode_file_carries_the_side_networks_cache(tmp_path, name, format):
    """The side network's blocks keep keys and values of their own: a decode file takes and returns them after
    the model's, and generates in a fresh process the tokens qm.generate does."""
    if format == "onnx":
        pytest.importorskip("onnxruntime")
    qm = qgraph.transform(tiny_causal_lm("llama", layers=2), "qst-nf4")
    with torch.no_grad():  # the head reads half the side network's output, so a file without its cache fails
        side_network(qm).mix.fill_(0.5)
    finalized = qgraph.finalize(qm)
    report = qgraph.export.export_report(finalized, tmp_path / name, format=format, decode=True,
                                         console=Console(quiet=True))
    target = qgraph.export.get_target(format)
    cases = check_cases(int(finalized.info.config.vocab_size))
    result = run_in_runtime(target.runner_path, report.path, cases,
                            extra_args=[*report.runtime.runner_args, "--generate", "16"])
    backbone = qgraph.finalize(qgraph.transform(tiny_causal_lm("llama", layers=2), "nf4"))
    for case, tokens in zip(cases, result.tokens):
        generate = {"attention_mask": case.attention_mask, "max_new_tokens": 16, "fused_kernels": False}
        expected = finalized.generate(case.input_ids, **generate)[:, case.input_ids.shape[1]:]
        assert torch.equal(torch.from_numpy(tokens), expected)
        assert not torch.equal(backbone.generate(case.input_ids, **generate)[:, case.input_ids.shape[1]:], expected)
    side = finalized.decode_graph.side_cache
    assert finalized.decode_graph.past_count == 2 * 2 + 2 * side.layers and side.heads == side_network(qm).config.heads


def test_the_aoti_runner_is_told_every_stack_of_a_qst_decode_cache(monkeypatch):
    """A package does not show its inputs' shapes: the runner's --cache flag carries the model's and the side
    network's, and the runner reads back one (heads, head_dim, dtype) per past tensor, in the signature's order.
    (The aoti target compiles the pt2 target's decode program, which the test above runs.)"""
    import importlib.util
    import sys

    from qgraph.export.aoti import CACHE_FLAG, TARGET, cache_flag

    decode = qgraph.transform(tiny_causal_lm("llama", layers=2), "qst-nf4").decode_graph
    monkeypatch.syspath_prepend(str(TARGET.runner_path.parent))  # the runner imports _decoding beside it
    spec = importlib.util.spec_from_file_location("qgraph_test_aoti_runner", TARGET.runner_path)
    runner = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, runner)  # its dataclasses look their module up there
    spec.loader.exec_module(runner)
    shapes = runner.past_shapes([CACHE_FLAG, cache_flag(decode.caches)])
    expected = [(int(t.shape[1]), int(t.shape[3]), t.numpy().dtype) for t in decode.empty_past(1, torch.device("cpu"))]
    assert shapes == expected and len(shapes) == 4 + 2 * decode.side_cache.layers


def test_a_bfloat16_module_is_refused_where_its_runtime_cannot_run_it(tmp_path):
    pytest.importorskip("onnxruntime")

    fin = qgraph.finalize(qgraph.transform(tiny_causal_lm("llama", layers=1), "lrqat-w4", dtype=torch.bfloat16))
    # ONNX Runtime has no bfloat16 CPU kernels: the file used to be written, then fail to load
    with pytest.raises(qgraph.ExportError, match=r"ONNX Runtime's CPU kernels take no bfloat16.*float32 module"):
        qgraph.export(fin, tmp_path / "model.onnx", console=Console(quiet=True))
    # the runners' numpy decode loop has no bfloat16: pt2's runner used to die converting the cache
    with pytest.raises(qgraph.ExportError, match=r"decode=True with a bfloat16 KV cache"):
        qgraph.export(fin, tmp_path / "model.pt2", decode=True, console=Console(quiet=True))
    assert not any(tmp_path.iterdir())
    report = qgraph.export.export_report(fin, tmp_path / "model.pt2", console=Console(quiet=True))  # the logits program runs
    assert report.parity.top1_agreement == 1.0


def test_example_inputs_are_checked_and_cast_as_capture_takes_them(lrqat_module, tmp_path, monkeypatch):
    from qgraph.errors import CaptureError

    # a batch-1 example failed inside torch.export ("Constraints violated (batch)")
    with pytest.raises(CaptureError, match=r"batch and sequence length >= 2 .* got shape \(1, 6\)"):
        qgraph.export(lrqat_module, tmp_path / "m.pt2", example_inputs=torch.ones(1, 6, dtype=torch.long))
    with pytest.raises(CaptureError, match="example attention_mask must be a tensor of integers"):
        qgraph.export(lrqat_module, tmp_path / "m.pt2", example_inputs={"input_ids": torch.ones(2, 6, dtype=torch.long),
                                                                         "attention_mask": torch.ones(2, 6)})
    assert not any(tmp_path.iterdir())
    # an int32 or bool mask (the module takes both) is the int64 mask the program is exported with; it failed
    # with "Tensor dtype mismatch"
    ids = torch.randint(3, 200, (2, 6), generator=torch.Generator().manual_seed(0))
    report = qgraph.export.export_report(lrqat_module, tmp_path / "m.pt2", console=Console(quiet=True),
                                         example_inputs=(ids, torch.ones(2, 6, dtype=torch.bool)))
    assert report.parity.top1_agreement == 1.0
