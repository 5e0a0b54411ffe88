"""The aoti target: the aten program compiled by AOTInductor, run by aoti_load_package in a fresh process
without qgraph. Compiles take tens of seconds each: two, marked slow."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

import qgraph
from qgraph.export.aoti import TARGET, AotiOptions
from qgraph.export.program import fp32_bytes
from qgraph.models import tiny_causal_lm
from tests.conftest import random_ids


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def finalized(family: str, plan: str, *, hidden: int = 64, **options) -> qgraph.QGraphModule:
    return qgraph.finalize(qgraph.transform(tiny_causal_lm(family, layers=1, hidden=hidden), plan, **options))


def test_a_package_is_a_pt2_file(tmp_path):
    module = finalized("llama", "lrqat-w4")
    assert TARGET.unsupported(module, AotiOptions()) is None
    with pytest.raises(qgraph.ExportError, match=r"AOTInductor packages are \.pt2 files, got 'model\.so'.*model\.pt2"):
        qgraph.export(module, tmp_path / "model.so", format="aoti", console=quiet())
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize(("family", "plan", "options", "mapping"), [
    ("llama", "lrqat-w4", {"group_size": 32},
     {"qgraph::int4_linear x7": "aten: bitwise unpack + mul + linear (codes stay uint8)"}),
    ("qwen2", "nf4", {}, {"qgraph::nf4_linear x7": "aten: nibble unpack + 16-level table lookup + absmax mul + "
                                                   "linear (codes stay uint8, absmax stays double-quantized)"}),
])
def test_the_aot_compiled_package_runs_without_qgraph(tmp_path, family, plan, options, mapping):
    module = finalized(family, plan, hidden=512, **options)  # weights that outweigh the compiled code (~2 MB)
    path = tmp_path / "model_aoti.pt2"
    report = qgraph.export.export_report(module, path, format="aoti", console=quiet())

    # the export check ran the package in a fresh process without qgraph, on two shapes, one padded
    assert report.target == "aoti" and report.op_mapping == mapping
    assert report.parity.max_abs_diff <= TARGET.tolerance and report.parity.top1_agreement == 1.0
    assert any(note.startswith("AOTInductor compile: ") for note in report.notes)
    assert path.stat().st_size < 0.5 * fp32_bytes(module)
    # a third shape in this process: batch and sequence stay dynamic, right padding leaves real tokens alone
    input_ids = random_ids((3, 10), seed=5)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, 6:] = 0
    compiled = torch._inductor.aoti_load_package(str(path))
    with torch.no_grad():
        got = compiled(input_ids=input_ids, attention_mask=attention_mask)
        want = module(input_ids=input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    assert float((got[real] - want[real]).abs().max()) <= TARGET.tolerance


def test_a_decode_package_generates_the_tokens_qm_generates(tmp_path):
    from qgraph.export.check import check_cases, run_in_runtime

    fin = qgraph.finalize(qgraph.transform(tiny_causal_lm("llama", layers=2), "rtn-w4"))
    report = qgraph.export.export_report(fin, tmp_path / "model.pt2", format="aoti", decode=True, console=quiet())
    cases = check_cases(int(fin.info.config.vocab_size))
    result = run_in_runtime(TARGET.runner_path, report.path, cases,
                            extra_args=[*report.runtime.runner_args, "--generate", "16"])
    for case, tokens in zip(cases, result.tokens):
        # fused_kernels=False: the file computes the module's float32 forward, not generate's bf16 kernels
        expected = fin.generate(case.input_ids, attention_mask=case.attention_mask, max_new_tokens=16,
                                fused_kernels=False)
        assert torch.equal(torch.from_numpy(tokens), expected[:, case.input_ids.shape[1]:])
