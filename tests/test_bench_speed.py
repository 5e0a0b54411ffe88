"""tools/bench_speed.py on a tiny Llama: every configuration builds and steps, every generator decodes, and
the table checks each target against the right peer."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import make_llama, random_ids

pytest.importorskip("torchao", reason="the bench extra (torchao) is not installed: pip install -e .[bench]")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # the tools import benchlib as a sibling
import bench_speed  # noqa: E402
from bench_speed import Report, build_generators, build_training, markdown_table  # noqa: E402
from benchlib import train_step  # noqa: E402

HAS_PEFT = importlib.util.find_spec("peft") is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", bench_speed.TRAIN_CONFIGS)
def test_every_training_configuration_steps_in_either_dtype(config, dtype):
    if config == "qlora" and not HAS_PEFT:
        pytest.skip("QLoRA needs peft (the bench extra)")
    module, optimizer = build_training(config, make_llama(), dtype)
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    before = [p.detach().clone() for p in trained]
    loss = train_step(module.train(), optimizer, random_ids((2, 16)))
    assert torch.isfinite(torch.tensor(loss))
    assert any(not torch.equal(b, p) for b, p in zip(before, trained))
    assert module(input_ids=random_ids((2, 16))).logits.dtype == dtype


@pytest.mark.skipif(not HAS_PEFT, reason="the bnb peer is built with bench_qst's helpers (peft)")
def test_every_generator_decodes_and_the_cached_tokens_equal_the_recomputed_ones():
    generators = build_generators(make_llama, random_ids((1, 6)), 5)
    with torch.no_grad():
        out = {name: generate() for name, generate in generators.items()}
    assert {tuple(t.shape) for t in out.values()} == {(1, 11)}
    assert torch.equal(out["qgraph-nf4"], out["qgraph-nf4-nocache"])
    # qgraph-int4 (bf16 kernel) against its float32 reference is a measurement, not a promise: not asserted
    assert set(out) == {*bench_speed.GEN_CONFIGS, "qgraph-int4-float32-reference"}


def test_the_table_quotes_each_target_against_its_peer_and_fails_different_tokens():
    report = Report({"new_tokens": 10}, seconds={
        "lrqat-w4/bf16": [1.0, 1.2, 1.1], "lrqat-w4/fp32": [3.0, 3.0, 3.0], "torchao-qat/bf16": [2.0, 2.0, 2.0],
        "lrqat-w4/amp-bf16": [1.5],
        "qgraph-nf4": [0.5], "transformers-bnb-nf4": [1.0], "qgraph-int4": [2.0], "transformers-fp32": [1.0]},
        same_tokens={"qgraph-nf4": False, "qgraph-int4": True})
    table = markdown_table(report)
    assert "| lrqat-w4 bf16 vs fp32 step | lrqat-w4/bf16 | lrqat-w4/fp32 | 1.100 | 3.000 | 2.73x | >= 2.5x | yes |" \
        in table
    assert "lrqat-w4 bf16 vs torchao QAT bf16 | lrqat-w4/bf16 | torchao-qat/bf16 | 1.100 | 2.000 | 1.82x | >= 2x | no |" \
        in table
    assert "| lrqat-w4 mixed bf16 (autocast) vs fp32 step | lrqat-w4/amp-bf16 | lrqat-w4/fp32 | 1.500 | 3.000 | 2.00x" \
        in table
    assert "| 2.00x | >= 1x | no (different tokens) |" in table  # faster, but not the same tokens
    assert "| 0.50x | >= 1x | no |" in table
    assert "qst-nf4 vs QLoRA" not in table  # not measured: no row
    assert "| qgraph-nf4 | 20.0 | transformers-bnb-nf4: NO |" in table


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qst_split_parts_run_and_the_table_takes_the_backbone_as_the_rest(dtype):
    parts = bench_speed.build_qst_split(make_llama(), make_llama(), dtype, random_ids((2, 16)))
    assert set(parts) == set(bench_speed.QST_SPLIT) - {"backbone forward"}
    report = Report({"new_tokens": 1})
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    for part, call in parts.items():
        call()
        report.seconds[f"qst-split/{name}/{part}"] = [1.0 if part == "step" else 0.1]
    table = markdown_table(report)
    assert "| backbone forward | 0.700 | 70% |" in table and "| side network | 0.100 | 10% |" in table


def test_the_qst_splits_head_part_trains_the_heads_delta(monkeypatch):
    built = {}

    def build_and_keep(*args, **kwargs):
        built["module"], optimizer = build_training(*args, **kwargs)
        return built["module"], optimizer
    monkeypatch.setattr(bench_speed, "build_training", build_and_keep)
    parts = bench_speed.build_qst_split(make_llama(), make_llama(), torch.float32, random_ids((2, 16)))
    delta = built["module"].graph_module.qst_head_delta
    delta.zero_grad(set_to_none=True)
    parts["head + loss"]()
    # the real step before it moved `up` off 0, so both factors get a gradient from the head's part
    assert delta.up.grad is not None and delta.up.grad.abs().sum() > 0
    assert delta.down.grad is not None and delta.down.grad.abs().sum() > 0


def test_compiled_variants_are_qgraphs_model_dtypes_and_the_table_checks_the_first_step():
    variants = bench_speed.training_variants(["lrqat-w4", "qlora"], ["fp32", "bf16", "amp-bf16"], compiled=True)
    assert variants[-2:] == [("lrqat-w4", "fp32-compiled"), ("lrqat-w4", "bf16-compiled")]  # no peer, no autocast
    assert bench_speed.training_variants(["lrqat-w4"], ["fp32"], compiled=False) == [("lrqat-w4", "fp32")]
    with pytest.raises(ValueError, match="peer, not compiled"):
        build_training("qlora", make_llama(), compile=True)
    report = Report({"new_tokens": 10}, seconds={
        "lrqat-w4/fp32": [2.0], "lrqat-w4/fp32-compiled": [1.5], "lrqat-w4/bf16-compiled": [1.0]},
        first={"lrqat-w4/fp32": 2.1, "lrqat-w4/fp32-compiled": 41.7, "lrqat-w4/bf16-compiled": 130.0})
    table = markdown_table(report)
    assert "| lrqat-w4 compiled vs eager step, fp32 | lrqat-w4/fp32-compiled | lrqat-w4/fp32 | 1.500 | 2.000 | 1.33x " \
           "| >= 1.3x | yes |" in table
    assert "| lrqat-w4/fp32-compiled | 41.7 | <= 120 s | yes |" in table
    assert "| lrqat-w4/bf16-compiled | 130.0 | <= 120 s | no |" in table
    assert "| lrqat-w4/fp32 | 2.1 |" not in table  # an eager first step is no compile


@pytest.mark.slow
def test_a_compiled_training_configuration_steps():
    module, optimizer = build_training("lrqat-w4", make_llama(), compile=True)
    assert module.report.compiled.startswith("torch.compile: ")
    assert torch.isfinite(torch.tensor(train_step(module.train(), optimizer, random_ids((2, 16)))))


@pytest.mark.parametrize(("flag", "value", "least"), [
    ("--rounds", "0", 1), ("--gen-rounds", "0", 1), ("--threads", "-1", 0), ("--batch-size", "0", 1),
    ("--block-len", "1", 2), ("--prompt-tokens", "0", 1), ("--new-tokens", "0", 1),
])
def test_a_count_below_its_least_is_a_usage_error_before_anything_is_built(monkeypatch, capsys, tmp_path, flag, value,
                                                                          least):
    nothing_measured(monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        bench_speed.main([flag, value, "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert f"argument {flag}: must be at least {least}" in capsys.readouterr().err


def test_an_output_path_that_is_a_file_is_a_usage_error_before_anything_is_built(monkeypatch, capsys, tmp_path):
    nothing_measured(monkeypatch)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as exit_:
        bench_speed.main(["--out", str(tmp_path / "a-file")])
    assert exit_.value.code == 2 and f"--out {tmp_path / 'a-file'} is a file" in capsys.readouterr().err


def nothing_measured(monkeypatch) -> None:
    for rounds in ("training_rounds", "qst_split_rounds", "generation_rounds"):
        monkeypatch.setattr(bench_speed, rounds, lambda *args: pytest.fail("measured despite a bad flag"))
