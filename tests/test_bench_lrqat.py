"""tools/bench_lrqat.py's 8da4w configurations on a tiny Llama: each builds a module that trains what it says,
torchao's convert step deploys what its QAT trained, and the table quotes lrqat-w4a8 against its own peer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import make_llama, random_ids

pytest.importorskip("torchao", reason="the bench extra (torchao) is not installed: pip install -e .[bench]")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # the tools import benchlib as a sibling
import bench_lrqat  # noqa: E402
from benchlib import Result, logits_of, markdown_table, train_step  # noqa: E402

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
