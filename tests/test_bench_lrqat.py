"""tools/bench_lrqat.py's 8da4w configurations on a tiny Llama: each builds a module that trains what it says,
torchao's convert step deploys what its QAT trained, and the table quotes lrqat-w4a8 against its own peer."""

from __future__ import annotations

import json
import sys
from argparse import Namespace
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from tests.conftest import make_llama, random_ids

pytest.importorskip("torchao", reason="the bench extra (torchao) is not installed: pip install -e .[bench]")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # the tools import benchlib as a sibling
import bench_lrqat  # noqa: E402
import benchlib  # noqa: E402
from benchlib import PteFigures, Result, logits_of, markdown_table, train_step  # noqa: E402

from qgraph.errors import ExportError  # noqa: E402

NEW_CONFIGS = ("lrqat-w4a8", "torchao-8da4w-qat", "torchao-8da4w-qat-ckpt")


def trained_tiny(config: str, steps: int = 2):
    model = make_llama()
    frozen_before = {name: p.detach().clone() for name, p in model.named_parameters()
                     if "embed" in name or "norm" in name or "lm_head" in name}
    module, optimizer = bench_lrqat.build(config, model)
    module.train()
    trainable = [p for p in module.parameters() if p.requires_grad]
    trainable_before = [p.detach().clone() for p in trainable]
    losses = [train_step(module, optimizer, random_ids((2, 16), seed=step)) for step in range(steps)]
    module.eval()
    return model, module, frozen_before, trainable, trainable_before, losses


@pytest.mark.parametrize("config", NEW_CONFIGS)
def test_new_configs_train_their_parameters_and_nothing_else(config):
    model, module, frozen_before, trainable, trainable_before, losses = trained_tiny(config)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert trainable and any(not torch.equal(p, q) for p, q in zip(trainable, trainable_before))
    for name, param in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(param, frozen_before[name]), f"{config} moved frozen {name}"


@pytest.mark.parametrize("config", ("torchao-8da4w-qat", "torchao-8da4w-qat-ckpt"))
def test_torchao_8da4w_fake_quantizes_every_decoder_linear_as_8da4w(config):
    from torchao.quantization.qat.fake_quantize_config import _infer_fake_quantize_configs
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    model, _ = bench_lrqat.build(config, make_llama())
    fake_quantized = {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantizedLinear)}
    decoder_linears = {name for name, m in make_llama().named_modules()
                       if isinstance(m, torch.nn.Linear) and ".layers." in name}
    assert set(fake_quantized) == decoder_linears  # the head stays a plain linear
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"{n}.weight" for n in decoder_linears}
    # what convert applies infers the same quantizers as trained (scale precision: None means the input's)
    inferred = _infer_fake_quantize_configs(bench_lrqat.torchao_8da4w_base_config())
    linear = next(iter(fake_quantized.values()))
    trained = (linear.activation_fake_quantizer.config, linear.weight_fake_quantizer.config)
    for was, will in zip(trained, inferred):
        assert (was.dtype, was.granularity, was.mapping_type) == (will.dtype, will.granularity, will.mapping_type)
    assert trained[0].dtype == torch.int8 and trained[1].dtype == torch.int4
    assert trained[1].granularity.group_size == 32


@pytest.mark.parametrize("config", ("lrqat-w4a8", "torchao-8da4w-qat"))
def test_deployed_form_gives_the_trained_logits(config):
    _, module, *_ = trained_tiny(config)
    ids = random_ids((2, 16), seed=9)
    with torch.no_grad():
        trained = logits_of(module, ids)
        deployed_module = bench_lrqat.deployed(config, module)
        deployed = logits_of(deployed_module, ids)
    if config.startswith("torchao"):  # converted: int4 weights (int8 codes unpacked), not fake-quantized floats
        weight = deployed_module.model.layers[0].mlp.down_proj.weight
        assert type(weight).__name__ == "IntxUnpackedToInt8Tensor"
    # qgraph.finalize is exact; torchao's convert recomputes the same int4/int8 grid in another order of ops
    torch.testing.assert_close(deployed, trained, rtol=0, atol=1e-4 * trained.abs().max().item())
    assert bench_lrqat.deployed("lrqat-w4", module) is None


def result(config: str, total_gib: float, step_s: float, deployed_ppl: float = 0.0) -> Result:
    return Result(config, 5, memory={"Total": int(total_gib * 2**30)}, peak_rss=2**30, step_seconds=step_s,
                  perplexity=10.0, deployed_perplexity=deployed_ppl)


def test_table_quotes_paired_configs_against_their_own_peer_and_leaves_the_others_as_before():
    results = [result("lrqat-w4", 1.0, 4.0), result("torchao-qat", 4.0, 8.0),
               result("lrqat-w4a8", 1.0, 5.0, deployed_ppl=11.0), result("torchao-8da4w-qat", 3.0, 10.0, 12.0)]
    table = markdown_table(results, "torchao-qat", "torchao QAT", bench_lrqat.PAIRS).splitlines()
    assert table[0].endswith("| held-out ppl | deployed ppl |")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table[2:]}
    assert "| 3.00x less (vs torchao-8da4w-qat) | 2.00x faster (vs torchao-8da4w-qat) | 10.00 | 11.00 |" \
        in rows["lrqat-w4a8"]
    assert "| 4.00x less | 2.00x faster | 10.00 | - |" in rows["lrqat-w4"]
    # without deployed perplexities (every older run) the table is exactly the one it always was
    old = markdown_table(results[:2], "torchao-qat", "torchao QAT", bench_lrqat.PAIRS).splitlines()
    assert old[0].endswith("| time vs torchao QAT | held-out ppl |")
    assert old[2] == "| lrqat-w4 | 5 | 1.00 | 0.00 | 0.00 | 0.00 | 0.00 | 1.00 | 4.00 | 4.00x less | 2.00x faster | 10.00 |"


def test_table_gives_an_autocast_configurations_float32_perplexity_beside_its_own():
    mixed = Result("lrqat-w4-autocast", 5, perplexity=10.5, float32_perplexity=10.25)
    table = markdown_table([result("torchao-qat", 4.0, 8.0), mixed], "torchao-qat", "torchao QAT").splitlines()
    assert table[3].endswith("| 10.50 (float32: 10.25) |")
    assert table[2].endswith("| 10.00 |")


# --- --pte: the deployed forms as ExecuTorch .pte files ---------------------------------------------------------


def run_main_capturing(monkeypatch, argv: list[str], bench=None) -> dict:
    """benchlib.main(argv) with run_config replaced by a recorder of what it was called with."""
    seen = {}

    def fake_run_config(bench, config, *args, **kwargs):
        seen["config"], seen["args"], seen["kwargs"] = config, args, kwargs
        return Result(config, 5)

    monkeypatch.setattr(benchlib, "run_config", fake_run_config)
    benchlib.main(bench or bench_lrqat.BENCH, argv)
    return seen


def test_pte_flag_parses_and_puts_the_pte_next_to_the_configuration_json(monkeypatch, tmp_path):
    json_path = tmp_path / "lrqat-w4a8.json"
    seen = run_main_capturing(monkeypatch, ["--run", "lrqat-w4a8", "--json", str(json_path), "--steps", "5", "--pte"])
    assert seen["config"] == "lrqat-w4a8" and seen["args"][-1] == tmp_path / "lrqat-w4a8.pte"
    assert json_path.exists()
    # off by default: no .pte path, so nothing is exported
    without = run_main_capturing(monkeypatch, ["--run", "fp", "--json", str(json_path), "--steps", "5"])
    assert without["args"][-1] is None
    # the parent hands the flag on to each configuration's process, and only when given
    args = Namespace(steps=5, timing_steps=3, eval_blocks=2, batch_size=1, block_len=64, warmup=0, decay="constant",
                     seed=0)
    assert "--pte" not in benchlib._shared_flags(args)
    assert benchlib._shared_flags(Namespace(**vars(args), pte=True))[-1] == "--pte"


def test_the_learning_rate_schedule_warms_up_then_decays_as_asked(monkeypatch, tmp_path):
    factors = [benchlib.lr_factor(i, 10, 2, "cosine") for i in range(10)]
    assert factors[:2] == [1 / 3, 2 / 3] and factors[2] == 1.0
    assert all(a > b for a, b in zip(factors[2:], factors[3:])) and 0 < factors[-1] < 0.05
    assert [benchlib.lr_factor(i, 10, 0, "constant") for i in range(10)] == [1.0] * 10
    seen = run_main_capturing(monkeypatch, ["--run", "fp", "--json", str(tmp_path / "fp.json"), "--steps", "5",
                                            "--warmup", "2", "--decay", "cosine"])
    assert seen["kwargs"] == {"warmup": 2, "decay": "cosine", "seed": benchlib.SEED}
    flags = benchlib._shared_flags(Namespace(steps=5, timing_steps=3, eval_blocks=2, batch_size=1, block_len=64,
                                             warmup=2, decay="cosine", seed=0))
    assert flags[-6:-2] == ["--warmup", "2", "--decay", "cosine"]


def test_seed_reaches_each_configurations_process_and_jobs_run_them_side_by_side(monkeypatch, tmp_path):
    seen = run_main_capturing(monkeypatch, ["--run", "fp", "--json", str(tmp_path / "fp.json"), "--steps", "5",
                                            "--seed", "3"])
    assert seen["kwargs"]["seed"] == 3
    calls = []

    def fake_subprocess(script, flags, json_path, label, console, threads=None, show_status=True):
        config = flags[flags.index("--run") + 1]
        calls.append((config, flags[flags.index("--seed") + 1], threads, show_status))
        return asdict(Result(config, 0, settings={"seed": 3}))

    monkeypatch.setattr(benchlib, "run_in_subprocess", fake_subprocess)
    monkeypatch.setattr(benchlib.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(benchlib, "chart", lambda *args: None)
    monkeypatch.setattr(benchlib, "loss_curves", lambda *args: None)
    benchlib.main(bench_lrqat.BENCH, ["--configs", "fp", "rtn-w4", "lrqat-w4", "--steps", "5", "--seed", "3",
                                      "--jobs", "2", "--out", str(tmp_path)])
    assert sorted(calls) == [(c, "3", 2, False) for c in ("fp", "lrqat-w4", "rtn-w4")]  # 4 cores, 2 each
    written = json.loads((tmp_path / "results.json").read_text())
    assert [r["config"] for r in written] == ["fp", "rtn-w4", "lrqat-w4"]  # in the asked order, whichever ends first
    assert benchlib.threads_per_job(1) is None  # one job: torch's own default
    with pytest.raises(SystemExit):
        benchlib.main(bench_lrqat.BENCH, ["--configs", "fp", "--jobs", "0"])
    # --reuse refuses a result of another seed
    (tmp_path / "fp.json").write_text(json.dumps(asdict(Result("fp", 0, settings={"seed": 1}))))
    with pytest.raises(SystemExit, match="seed 1, not 3"):
        benchlib.main(bench_lrqat.BENCH, ["--configs", "fp", "--steps", "5", "--seed", "3", "--reuse",
                                          "--out", str(tmp_path)])


def test_loss_curves_are_moving_averages_drawn_to_a_png(tmp_path):
    assert benchlib.moving_average([4.0, 2.0, 6.0, 0.0], 2) == [4.0, 3.0, 4.0, 3.0]
    pytest.importorskip("matplotlib", reason="the bench extra (matplotlib) is not installed")
    benchlib.loss_curves({"a": [3.0, 2.5, 2.0], "b": [3.0, 2.9, 2.8], "eval-only": []}, tmp_path / "losses.png")
    assert (tmp_path / "losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_bench_without_a_pte_hook_has_no_pte_flag(monkeypatch, tmp_path):
    with pytest.raises(SystemExit):
        run_main_capturing(monkeypatch, ["--run", "fp", "--json", str(tmp_path / "fp.json"), "--pte"],
                           bench=replace(bench_lrqat.BENCH, pte=None))


def test_prefill_block_is_the_first_held_out_tokens_in_one_row():
    heldout = torch.arange(300).view(5, 60)
    assert torch.equal(bench_lrqat.prefill_block(heldout), torch.arange(128).view(1, 128))
    with pytest.raises(ValueError, match="fewer than the 128"):
        bench_lrqat.prefill_block(heldout[:2])


def test_pte_is_only_for_the_8da4w_configurations_and_a_failed_export_is_a_note_not_a_crash(monkeypatch, tmp_path):
    assert bench_lrqat.pte("lrqat-w4", torch.nn.Linear(2, 2), random_ids((1, 128)), tmp_path / "x.pte") is None

    def refuse(model, path):
        raise ExportError("XNNPACK did not lower torchao's 8da4w program: 7 quantized linears, 6 ...\nmore")

    monkeypatch.setattr(bench_lrqat, "write_torchao_pte", refuse)
    (tmp_path / "x.pte").write_bytes(b"an earlier run's file")
    figures = bench_lrqat.pte("torchao-8da4w-qat", torch.nn.Linear(2, 2), random_ids((1, 128)), tmp_path / "x.pte")
    assert figures == PteFigures(note="not written: ExportError: XNNPACK did not lower torchao's 8da4w program: "
                                      "7 quantized linears, 6 ...")
    assert not (tmp_path / "x.pte").exists()  # not measured, and not left to be mistaken for this run's

    def fail_to_run(*args, **kwargs):
        raise RuntimeError("method load failed")

    monkeypatch.setattr(bench_lrqat, "write_torchao_pte", lambda model, path: "XNNPACK: ...")
    monkeypatch.setattr(bench_lrqat, "measure_pte", fail_to_run)
    figures = bench_lrqat.pte("torchao-8da4w-qat", torch.nn.Linear(2, 2), random_ids((1, 128)), tmp_path / "x.pte")
    assert figures == PteFigures(note="written, but ExecuTorch's runtime failed on it: "
                                      "RuntimeError: method load failed")


def test_torchao_delegation_problem_names_what_xnnpack_left_out():
    inside = Counter({"torchao.choose_qparams_affine": 7, "aten.linear": 8, "torchao.dequantize_affine": 14})
    assert bench_lrqat.torchao_delegation_problem(inside, Counter({"aten.embedding": 1}), 7) is None
    fewer = Counter({"torchao.choose_qparams_affine": 6, "aten.linear": 7})
    problem = bench_lrqat.torchao_delegation_problem(fewer, Counter({"aten.linear": 1}), 7)
    assert "7 quantized linears, 6 activation quantizations delegated" in problem and "aten.linear" in problem


@pytest.mark.parametrize("config", ("lrqat-w4a8", "torchao-8da4w-qat"))
def test_pte_of_the_deployed_module_runs_in_executorch_and_matches_it(tmp_path, config):
    pytest.importorskip("executorch", reason="executorch is not installed (pip install -e '.[executorch]'): "
                                             "--pte writes and runs .pte files with it")
    module, _ = bench_lrqat.build(config, make_llama(layers=1))
    module.eval()
    deployed_module = bench_lrqat.deployed(config, module)
    heldout = random_ids((2, 128), seed=4)
    path = tmp_path / f"{config}.pte"
    figures = bench_lrqat.pte(config, deployed_module, heldout, path)
    assert figures.note.startswith("XNNPACK: 7 of 7 8da4w linears delegated"), figures.note
    assert figures.file_bytes == path.stat().st_size > 0
    assert 0 < figures.prefill_ms < 10_000
    with torch.no_grad():
        logits = logits_of(deployed_module, heldout[:1])
    # XNNPACK's int8 activation rounding may land a token one step away: a fraction of a % of the logits' range
    assert figures.max_abs_diff < 0.01 * (logits.max() - logits.min()).item()
    assert figures.top1_agreement >= 0.9


def test_table_puts_the_pte_figures_side_by_side_and_leaves_other_rows_blank():
    lrqat, torchao = result("lrqat-w4a8", 1.0, 5.0, 11.0), result("torchao-8da4w-qat", 3.0, 10.0, 12.0)
    lrqat.pte = asdict(PteFigures(80 * 2**20, 200.0, 0.05, 0.99, "XNNPACK: ..."))
    torchao.pte = asdict(PteFigures(100 * 2**20, 300.0, 0.5, 0.95, "XNNPACK: ..."))
    failed = result("torchao-8da4w-qat-ckpt", 2.0, 9.0, 12.0)
    failed.pte = asdict(PteFigures(note="not written: ExportError: left | out"))
    results = [result("lrqat-w4", 1.0, 4.0), result("torchao-qat", 4.0, 8.0), lrqat, torchao, failed]
    table = markdown_table(results, "torchao-qat", "torchao QAT", bench_lrqat.PAIRS).splitlines()
    assert table[0].endswith("| deployed ppl | pte MiB | pte prefill (ms) | pte vs deployed | pte vs peer |")
    # every row has the header's cells: an escaped \| in a note stays inside its cell
    assert all(line.replace("\\|", "").count("|") == table[0].count("|") for line in table[1:])
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table[2:]}
    assert rows["lrqat-w4a8"].endswith("| 11.00 | 80.0 | 200 | max abs diff 0.05, top-1 99.0% "
                                       "| 1.25x smaller, 1.50x faster (vs torchao-8da4w-qat) |")
    assert rows["torchao-8da4w-qat"].endswith("| 100.0 | 300 | max abs diff 0.5, top-1 95.0% | - |")
    assert rows["torchao-8da4w-qat-ckpt"].endswith("| - | - | not written: ExportError: left \\| out | - |")
    assert rows["lrqat-w4"].endswith("| 10.00 | - | - | - | - | - |")


def test_the_autocast_configuration_trains_the_float32_model_in_mixed_precision():
    """lrqat-w4-autocast: a float32 module whose steps run under autocast(bf16) (benchlib.mixed_precision), its
    trained parameters float32, its logits bf16 there and float32 outside."""
    assert bench_lrqat.BENCH.autocast == {"lrqat-w4-autocast": torch.bfloat16}
    module, optimizer = bench_lrqat.build("lrqat-w4-autocast", make_llama())
    with benchlib.mixed_precision(bench_lrqat.BENCH.autocast["lrqat-w4-autocast"]):
        losses = [train_step(module.train(), optimizer, random_ids((2, 16), seed=step)) for step in range(2)]
        assert logits_of(module.eval(), random_ids((1, 8))).dtype == torch.bfloat16
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.float32 for p in module.parameters() if p.requires_grad)
    assert logits_of(module, random_ids((1, 8))).dtype == torch.float32
    with benchlib.mixed_precision(None):
        assert not torch.is_autocast_enabled("cpu")
