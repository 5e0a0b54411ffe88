"""The pt2 target: qgraph's ops decomposed into aten, the program saved by torch.export.save and run by
torch.export.load in a fresh process without qgraph."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

import qgraph
from qgraph.export.aten import decompose_qgraph_ops, int4_linear_aten, nf4_linear_aten, qgraph_op_counts
from qgraph.export.check import check_cases, run_in_runtime
from qgraph.export.program import example_kwargs, fp32_bytes
from qgraph.export.pt2 import TARGET, Pt2Options, exported_program
from qgraph.models import tiny_causal_lm
from qgraph.ops.nf4 import nf4_linear_from, nf4_linear_reference, quantize_nf4
from qgraph.quant.downcast import pack_codes
from qgraph.quant.uniform import expand_scale, grid_bounds, scale_shape
from tests.conftest import random_ids

INT4_TEXT = "aten: bitwise unpack + mul + linear (codes stay uint8)"
# (batch, seq, right padding of the last row): a shape the export check does not use
OTHER_SHAPE = (3, 9, 4)


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def finalized(family: str, plan: str, *, layers: int = 1, hidden: int = 64, **options) -> qgraph.QGraphModule:
    return qgraph.finalize(qgraph.transform(tiny_causal_lm(family, layers=layers, hidden=hidden), plan, **options))


@pytest.fixture(scope="module")
def llama_int4() -> qgraph.QGraphModule:
    """Shared by two tests (a transform takes seconds); export leaves the module as it was."""
    return finalized("llama", "lrqat-w4", group_size=32)


def padded_batch() -> dict[str, torch.Tensor]:
    batch, seq, padding = OTHER_SHAPE
    input_ids = random_ids((batch, seq), seed=7)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, seq - padding:] = 0
    input_ids[-1, seq - padding:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def max_diff_at_real_positions(got: torch.Tensor, want: torch.Tensor, attention_mask: torch.Tensor) -> float:
    real = attention_mask.bool()
    return float((got[real] - want[real]).abs().max())


def op_namespaces(graph: torch.fx.Graph) -> set[str]:
    return {node.target.namespace for node in graph.nodes
            if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)}


# --- the decompositions against the ops and a dense reference -------------------------------------------------


@pytest.mark.parametrize(("bits", "group_size", "in_features", "with_bias"), [
    (4, -1, 64, True),   # per channel: the scale multiplies the output
    (4, 16, 64, False),  # groups: the scale goes into the weight
    (3, 32, 96, True),   # 3-bit codes, packed like 4-bit ones
    (4, -1, 63, False),  # odd row: the last byte's high nibble is padding
    (8, 16, 48, True),   # above 4 bits the codes are int8, unpacked
])
def test_int4_decomposition_equals_the_op_and_the_dense_weight(bits, group_size, in_features, with_bias):
    generator = torch.Generator().manual_seed(bits * 1000 + in_features)
    out_features = 24
    qmin, qmax = grid_bounds(bits)
    w_int = torch.randint(qmin, qmax + 1, (out_features, in_features), generator=generator, dtype=torch.int8)
    scale = torch.rand(scale_shape(out_features, in_features, group_size), generator=generator) + 0.01
    bias = torch.randn(out_features, generator=generator) if with_bias else None
    x = torch.randn(2, 5, in_features, generator=generator)
    codes = pack_codes(w_int, bits)

    got = int4_linear_aten(x, codes, scale, bias, bits, group_size, in_features)
    op = torch.ops.qgraph.int4_linear(x, codes, scale, bias, bits, group_size, in_features)
    dense = F.linear(x, w_int.float() * expand_scale(scale, in_features), bias)
    assert torch.equal(got, op)  # the op's float operations in the op's order
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("shape", "blocksize", "double_quant"), [
    ((32, 128), 64, True),
    ((24, 40), 64, True),  # blocks straddle rows
    ((16, 64), 32, False),  # plain fp32 absmax
])
def test_nf4_decomposition_equals_the_op_and_the_reference(shape, blocksize, double_quant):
    generator = torch.Generator().manual_seed(shape[1])
    weight = torch.randn(shape, generator=generator)
    nf4 = quantize_nf4(weight, blocksize=blocksize, double_quant=double_quant)
    x = torch.randn(3, shape[1], generator=generator)
    bias = torch.randn(shape[0], generator=generator)

    got = nf4_linear_aten(x, nf4.packed, nf4.absmax, nf4.code, nf4.nested_absmax, nf4.nested_code, nf4.offset,
                          bias, *nf4.shape, nf4.blocksize, nf4.nested_blocksize)
    torch.testing.assert_close(got, nf4_linear_reference(x, nf4, bias), rtol=0, atol=1e-6)
    torch.testing.assert_close(got, nf4_linear_from(x, nf4, bias), rtol=0, atol=1e-5)


def test_a_qgraph_op_without_a_decomposition_is_named():
    # lrqat_linear is the trained form, never in a finalized graph: it has no decomposition
    graph = torch.fx.Graph()
    graph.output(graph.call_function(torch.ops.qgraph.lrqat_linear.default, (graph.placeholder("x"),)))
    with pytest.raises(qgraph.ExportError, match="qgraph::lrqat_linear has no aten decomposition"):
        decompose_qgraph_ops(torch.fx.GraphModule(torch.nn.Module(), graph))


# --- the target, through qgraph.export --------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "plan", "options", "op", "count", "within"), [
    ("llama", "lrqat-w4", {"group_size": 32}, "qgraph::int4_linear", 7, 1e-6),
    ("gpt2", "lrqat-w4", {}, "qgraph::int4_linear", 4, 1e-6),  # per channel; Conv1D linears, biases
    ("qwen2", "nf4", {}, "qgraph::nf4_linear", 7, 1e-5),  # q, k, v biases
    ("llama", "qst-nf4", {}, "qgraph::nf4_linear", 7, 1e-5),  # plus the side network (plain torch)
    ("gemma", "lrqat-w4", {"group_size": 32}, "qgraph::int4_linear", 7, 1e-6),  # (1 + w) norms, GELU, tied head
])
def test_every_plan_exports_to_an_aten_program_that_runs_without_qgraph(tmp_path, request, family, plan, options,
                                                                        op, count, within):
    shared = family == "llama" and plan == "lrqat-w4"
    module = request.getfixturevalue("llama_int4") if shared else finalized(family, plan, **options)
    assert TARGET.unsupported(module, Pt2Options()) is None
    report = qgraph.export.export_report(module, tmp_path / "model.pt2", console=quiet())

    # the export check ran the file in a fresh process without qgraph, on two shapes, one padded
    assert report.parity.max_abs_diff <= TARGET.tolerance and report.parity.top1_agreement == 1.0
    assert len(report.op_mapping) == 1 and report.op_mapping[f"{op} x{count}"].startswith("aten: ")
    program = torch.export.load(tmp_path / "model.pt2")
    assert qgraph_op_counts(program.graph) == {}
    assert op_namespaces(program.graph) == {"aten"}
    # dynamic batch and sequence, padding: a third shape, in this process, against the fused ops
    batch = padded_batch()
    with torch.no_grad():
        got = program.module()(**batch)
        want = module(**batch).logits
    assert got.shape == want.shape == (*batch["input_ids"].shape, 256)
    assert max_diff_at_real_positions(got, want, batch["attention_mask"]) <= within


def test_the_file_keeps_the_weights_packed(tmp_path):
    module = finalized("llama", "nf4", hidden=256)  # weights large enough to outweigh the graph's text
    path = tmp_path / "model.pt2"
    torch.export.save(exported_program(module, example_kwargs(module)), path)
    assert path.stat().st_size < 0.5 * fp32_bytes(module)
    stored = torch.export.load(path).state_dict
    packed = [name for name in stored if name.endswith("nf4_packed")]
    assert len(packed) == 7 and all(stored[name].dtype == torch.uint8 for name in packed)
    # no float tensor with a quantized weight's element count: nothing was dequantized into the file
    linear_sizes = {256 * 256, 256 * 128, 256 * int(module.info.config.intermediate_size)}
    assert not [name for name, tensor in stored.items() if tensor.is_floating_point() and tensor.numel() in linear_sizes
                and "embed" not in name and "lm_head" not in name]


def test_keep_ops_saves_the_fused_ops_which_load_only_after_importing_qgraph(tmp_path, llama_int4):
    report = qgraph.export.export_report(llama_int4, tmp_path / "model.pt2", keep_ops=True, console=quiet())
    assert TARGET.needs_qgraph(Pt2Options(keep_ops=True)) and not TARGET.needs_qgraph(Pt2Options())
    assert report.op_mapping == {
        "qgraph::int4_linear x7": "kept as the qgraph op (loads only where qgraph is imported)"}
    assert report.parity.max_abs_diff == 0.0
    assert qgraph_op_counts(torch.export.load(tmp_path / "model.pt2").graph) == {"qgraph::int4_linear": 7}
    # without the runner's --import-qgraph flag, a process without qgraph cannot load it
    with pytest.raises(qgraph.ExportError, match=r"could not run model\.pt2(.|\n)*error when deserializing"):
        run_in_runtime(TARGET.runner_path, tmp_path / "model.pt2", check_cases(256))


# --- the KV-cache signature (decode=True) ---------------------------------------------------------------------


@pytest.mark.parametrize("plan", ["lrqat-w4", "nf4"])
def test_a_decode_file_generates_the_tokens_qm_generates_in_a_fresh_process(tmp_path, plan):
    fin = finalized("llama", plan, layers=2)
    path = qgraph.export.export_report(fin, tmp_path / "model.pt2", decode=True, console=quiet()).path
    cases = check_cases(int(fin.info.config.vocab_size))
    result = run_in_runtime(TARGET.runner_path, path, cases, extra_args=["--generate", "16"])
    for case, tokens in zip(cases, result.tokens):
        # fused_kernels=False: the file computes the module's float32 forward, not generate's bf16 kernels
        expected = fin.generate(case.input_ids, attention_mask=case.attention_mask, max_new_tokens=16,
                                fused_kernels=False)
        assert tokens.shape == (case.input_ids.shape[0], 16)
        assert torch.equal(torch.from_numpy(tokens), expected[:, case.input_ids.shape[1]:])
    program = torch.export.load(path)
    assert "past_attention_mask" in program.graph_signature.user_inputs
    assert op_namespaces(program.graph) == {"aten"}


def test_decode_needs_a_decode_graph():
    bare = qgraph.transform(tiny_causal_lm("llama", layers=1), "nf4", kv_cache=False)
    assert "kv_cache=True" in TARGET.unsupported(bare, Pt2Options(decode=True))
    assert TARGET.unsupported(bare, Pt2Options()) is None
    assert "keep_ops=True applies to the logits program only" in TARGET.unsupported(
        qgraph.transform(tiny_causal_lm("llama", layers=1), "nf4"), Pt2Options(decode=True, keep_ops=True))
