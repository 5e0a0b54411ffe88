"""The onnx target: qgraph's int4 and NF4 layers as ONNX Runtime's MatMulNBits / MatMulBnb4, run by ORT.

The repacking into ORT's layouts is checked in plain PyTorch against the qgraph ops (the helper ops decode
ORT's layouts as ORT defines them); the exports are run by ORT in a fresh process on padded batches of two
shapes by qgraph.export itself, which raises unless the logits match within 1e-3.
"""

from __future__ import annotations

import io
from collections import Counter

import pytest
import torch
from rich.console import Console

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import qgraph  # noqa: E402
from qgraph.export import onnx_ops  # noqa: E402
from qgraph.export.onnx import qgraph_nodes  # noqa: E402
from qgraph.models import tiny_causal_lm  # noqa: E402
from qgraph.ops.int4 import int4_linear  # noqa: E402
from qgraph.ops.nf4 import nf4_linear_reference, quantize_nf4  # noqa: E402
from qgraph.quant.downcast import pack_codes  # noqa: E402
from qgraph.quant.uniform import grid_bounds  # noqa: E402

QUIET = dict(console=Console(file=io.StringIO()))


# --- the layouts, in plain PyTorch --------------------------------------------------------------------------


def _int_layer(bits: int, group_size: int, in_features: int, out_features: int = 24, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    qmin, qmax = grid_bounds(bits)
    codes = torch.randint(qmin, qmax + 1, (out_features, in_features), generator=generator, dtype=torch.int8)
    n_scales = 1 if group_size <= 0 else in_features // group_size
    scale = torch.rand(out_features, n_scales, generator=generator) + 0.05
    bias = torch.randn(out_features, generator=generator)
    return pack_codes(codes, bits), scale, bias


@pytest.mark.parametrize("bits, group_size, in_features", [
    (4, 32, 64), (4, -1, 64), (4, -1, 48), (4, -1, 192), (4, -1, 576), (3, 16, 64), (3, -1, 40), (8, 64, 128),
])
def test_repacked_int4_weights_give_the_ops_output(bits, group_size, in_features):
    codes, scale, bias = _int_layer(bits, group_size, in_features)
    x = torch.randn(3, 5, in_features)
    weight = onnx_ops.nbits_weight(codes, scale, bits, group_size, in_features)
    assert weight.block_size >= 16 and weight.block_size & (weight.block_size - 1) == 0
    assert weight.packed.dtype == torch.uint8 and weight.bits == (4 if bits <= 4 else 8)
    got = onnx_ops.matmul_nbits(x, weight.packed, weight.scales, bias, codes.shape[0], in_features, weight.bits,
                                weight.block_size)
    want = int4_linear(x, codes, scale, bias, bits, group_size, in_features)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)  # scale on the weight vs on the output


def test_per_channel_blocks_store_a_row_in_the_fewest_bytes():
    assert [onnx_ops.nbits_block_size(-1, k) for k in (64, 48, 192, 576, 1536, 100)] == [64, 64, 64, 64, 256, 128]
    assert onnx_ops.nbits_block_size(-1, 576, storage_bits=8) == 64
    assert onnx_ops.nbits_block_size(128, 1536) == 128
    codes, scale, _ = _int_layer(4, -1, 48)
    weight = onnx_ops.nbits_weight(codes, scale, 4, -1, 48)
    assert tuple(weight.packed.shape) == (24, 1, 32)
    # the padding past K holds the zero point (8 in both nibbles): a zero weight
    assert bool((weight.packed[:, 0, 24:] == 0x88).all())


def test_group_sizes_matmulnbits_cannot_hold_are_named():
    assert onnx_ops.nbits_unsupported(4, 128, 512) is None
    assert onnx_ops.nbits_unsupported(4, -1, 100) is None
    assert "group size 8" in onnx_ops.nbits_unsupported(4, 8, 64)
    assert "group size 48" in onnx_ops.nbits_unsupported(4, 48, 96)
    assert "group size 512" in onnx_ops.nbits_unsupported(4, 512, 1024)


@pytest.mark.parametrize("in_features, double_quant", [(64, True), (48, True), (96, False)])
def test_nf4_bytes_with_expanded_absmax_give_the_reference(in_features, double_quant):
    torch.manual_seed(0)
    weight = quantize_nf4(torch.randn(40, in_features), blocksize=64, double_quant=double_quant)
    assert torch.allclose(weight.code, torch.tensor(onnx_ops.NF4_LEVELS), atol=1e-7, rtol=0)
    absmax = onnx_ops.expanded_absmax(weight.absmax, weight.nested_absmax, weight.nested_code, weight.offset,
                                      weight.nested_blocksize)
    assert absmax.dtype == torch.float32 and absmax.numel() == -(-40 * in_features // 64)
    x, bias = torch.randn(2, 3, in_features), torch.randn(40)
    got = onnx_ops.matmul_bnb4(x, weight.packed.reshape(-1), absmax, bias, 40, in_features, 64)
    torch.testing.assert_close(got, nf4_linear_reference(x, weight, bias), atol=1e-5, rtol=1e-5)


def test_the_contrib_schemas_match_onnxruntimes_own():
    state = pytest.importorskip("onnxruntime.capi.onnxruntime_pybind11_state")
    if not hasattr(state, "get_all_operator_schema"):
        pytest.skip("this onnxruntime build does not expose its schemas")
    ort_schemas = {s.name: s for s in state.get_all_operator_schema() if s.domain == onnx_ops.CONTRIB_DOMAIN}
    for ours in onnx_ops.contrib_schemas():
        theirs = ort_schemas[ours.name]
        assert [i.name for i in ours.inputs] == [i.name for i in theirs.inputs]
        assert [i.option.name for i in ours.inputs] == [i.option.name for i in theirs.inputs]
        assert set(ours.attributes) == set(theirs.attributes)
        for name, attribute in ours.attributes.items():
            assert attribute.required == theirs.attributes[name].required, name
            if not attribute.required:  # onnxscript writes our defaults into every node
                their_default = onnx.AttributeProto.FromString(theirs.attributes[name]._default_value)
                assert attribute.default_value.i == their_default.i, name


# --- exports, run by ONNX Runtime in a fresh process --------------------------------------------------------

# one decoder layer each: every layer exports alike, and torch.export's trace is most of a test's time
EXPORTS = {
    "llama-lrqat-w4-g32": ("llama", {}, "lrqat-w4", {"group_size": 32}, {}),
    "qwen2-lrqat-w4-per-channel-external-data": ("qwen2", {}, "lrqat-w4", {}, {"external_data": True}),
    # K = 48 (one block padded to 64) and 192 (the MLP's intermediate: three blocks of 64 sharing the row's scale)
    "llama-lrqat-w4-per-channel-k48": ("llama", {"hidden": 48, "vocab": 32}, "lrqat-w4", {}, {}),
    "gpt2-nf4": ("gpt2", {}, "nf4", {}, {}),
    "llama-qst-nf4": ("llama", {}, "qst-nf4", {}, {}),
    "gemma-lrqat-w4-g32": ("gemma", {}, "lrqat-w4", {"group_size": 32}, {}),
}


@pytest.mark.parametrize("case", list(EXPORTS))
def test_export_runs_in_onnxruntime_with_the_modules_logits(case, tmp_path):
    family, model_kwargs, plan, plan_kwargs, options = EXPORTS[case]
    finalized = qgraph.finalize(qgraph.transform(tiny_causal_lm(family, layers=1, **model_kwargs), plan,
                                                   **plan_kwargs))
    expected_ops = Counter(node.target for node in qgraph_nodes(finalized.graph_module.graph))

    report = qgraph.export.export_report(finalized, tmp_path / "m.onnx", **QUIET, **options)

    assert report.parity.max_abs_diff <= 1e-3 and report.parity.top1_agreement == 1.0
    model = onnx.load(str(tmp_path / "m.onnx"))
    contrib = Counter(n.op_type for n in model.graph.node if n.domain == onnx_ops.CONTRIB_DOMAIN)
    want = "MatMulBnb4" if "nf4" in plan else "MatMulNBits"
    assert contrib == {want: sum(expected_ops.values())}
    assert {n.domain for n in model.graph.node} <= {"", onnx_ops.CONTRIB_DOMAIN}, "no qgraph or torch ops left"
    if want == "MatMulNBits":
        assert {a.i for n in model.graph.node if n.op_type == want for a in n.attribute
                if a.name == "accuracy_level"} == {onnx_ops.FP32_ACCURACY_LEVEL}
    for graph_input in model.graph.input:
        assert [d.dim_param for d in graph_input.type.tensor_type.shape.dim] == ["batch", "seq"]
    # the export worked on a copy: the finalized module still holds its qgraph ops
    assert Counter(node.target for node in qgraph_nodes(finalized.graph_module.graph)) == expected_ops
    if options.get("external_data"):
        assert (tmp_path / "m.onnx.data").stat().st_size > (tmp_path / "m.onnx").stat().st_size
        assert report.file_bytes == sum(f.stat().st_size for f in tmp_path.iterdir())
    if case.endswith("k48"):  # 4-bit stays 4-bit: most of this model is its linears
        assert report.file_bytes < 0.4 * qgraph.export.program.fp32_bytes(finalized)


def test_a_group_size_matmulnbits_cannot_hold_fails_before_writing(tmp_path):
    finalized = qgraph.finalize(qgraph.transform(tiny_causal_lm("llama", layers=1), "lrqat-w4", group_size=8))
    with pytest.raises(qgraph.ExportError, match=r"onnx target cannot export.*group size 8.*group_size=32"):
        qgraph.export(finalized, tmp_path / "m.onnx", **QUIET)
    assert not any(tmp_path.iterdir())


# --- the KV-cache signature (decode=True) ---------------------------------------------------------------------


@pytest.mark.parametrize("family, plan", [("llama", "lrqat-w4"), ("qwen2", "nf4")])
def test_a_decode_model_generates_the_tokens_qm_generates_in_onnx_runtime(tmp_path, family, plan):
    from qgraph.export.check import check_cases, run_in_runtime
    from qgraph.export.onnx import TARGET

    qm = qgraph.transform(tiny_causal_lm(family, layers=2), plan, **({"group_size": 32} if plan != "nf4" else {}))
    fin = qgraph.finalize(qm)
    path = qgraph.export.export_report(fin, tmp_path / "model.onnx", decode=True,
                                       console=Console(file=io.StringIO())).path
    cases = check_cases(int(fin.info.config.vocab_size))
    result = run_in_runtime(TARGET.runner_path, path, cases, extra_args=["--generate", "16"])
    for case, tokens in zip(cases, result.tokens):
        # fused_kernels=False: the file computes the module's float32 forward, not generate's bf16 kernels
        expected = fin.generate(case.input_ids, attention_mask=case.attention_mask, max_new_tokens=16,
                                fused_kernels=False)
        assert torch.equal(torch.from_numpy(tokens), expected[:, case.input_ids.shape[1]:])
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input][:4] == ["input_ids", "attention_mask", "past_attention_mask",
                                                       "position_ids"]
    assert [o.name for o in model.graph.output][:2] == ["logits", "present_0"]
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["MatMulNBits" if plan != "nf4" else "MatMulBnb4"] == 14
