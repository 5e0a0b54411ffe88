"""The aoti target: the aten program compiled by AOTInductor, run by aoti_load_package in a fresh process
without qgraph. Compiles take tens of seconds each: two, marked slow."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch
from rich.console import Console

import qgraph
from qgraph.export.aoti import CHECK_INPUTS_NOTE, TARGET, AotiOptions
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
    assert CHECK_INPUTS_NOTE in report.notes
    assert_checked_in_a_fresh_process(path)


# with AOTI_RUNTIME_CHECK_INPUTS=1, as the package's note asks: batch 1 and one token run (the lower bound of 2 is
# compiled out), a slice of a longer batch (another stride) and an int32 mask are refused; unchecked, both ran and
# gave wrong logits
CHECKED_RUN = """
import os, sys
os.environ["AOTI_RUNTIME_CHECK_INPUTS"] = "1"
import torch
package = torch._inductor.aoti_load_package(sys.argv[1])
ids = torch.randint(3, 200, (3, 20))
print(tuple(package(input_ids=ids[:1, :1].clone(), attention_mask=torch.ones(1, 1, dtype=torch.long)).shape))
for name, (i, m) in {"slice": (ids[:, :12], torch.ones(3, 12, dtype=torch.long)),
                     "int32": (ids[:, :12].contiguous(), torch.ones(3, 12, dtype=torch.int32))}.items():
    try:
        package(input_ids=i, attention_mask=m)
        print(name, "ran")
    except Exception:
        print(name, "refused")
"""


def assert_checked_in_a_fresh_process(path) -> None:
    run = subprocess.run([sys.executable, "-c", CHECKED_RUN, str(path)], capture_output=True, text=True, timeout=300)
    lines = [line for line in run.stdout.splitlines() if line.startswith(("(", "slice", "int32"))]
    assert lines[0].startswith("(1, 1, ") and lines[1:] == ["slice refused", "int32 refused"], run.stdout + run.stderr


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
