"""transform(..., dtype=): the graph computes in bf16, the plan quantizes from the float32 weights, the model stays."""

import pytest
import torch

import qgraph
import qgraph.cast
from qgraph.errors import PlanError, PretrainedError, QGraphError
from qgraph.side_network import side_network
from tests.conftest import make_llama, random_ids, train_steps

BF16 = torch.bfloat16
PLANS = ("nf4", "lrqat-w4", "qst-nf4", "lrqat-w4a8")


def floating_dtypes(qm) -> dict[str, torch.dtype]:
    state = dict(qm.graph_module.named_parameters()) | dict(qm.graph_module.named_buffers())
    return {name: t.dtype for name, t in state.items() if t.is_floating_point()}


@pytest.mark.parametrize("plan", PLANS)
def test_graph_computes_in_bf16_and_leaves_the_model(plan, snapshot):
    model = make_llama()
    before = snapshot(model)
    qm = qgraph.transform(model, plan, dtype=BF16, kv_cache=False)
    before.assert_unchanged(model)
    dtypes = floating_dtypes(qm)
    assert dtypes["model.embed_tokens.weight"] == BF16 and dtypes["lm_head.weight"] == BF16
    assert dtypes["model.norm.weight"] == BF16
    ids = random_ids((2, 12))
    out = qm(input_ids=ids, labels=ids)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert "dtype bfloat16: " in str(qm.report) and "quantized from their float32 weights" in qm.report.dtype


@pytest.mark.parametrize("plan", ["lrqat-w4", "nf4"])
def test_quantized_from_the_float32_weights_not_their_bf16_cast(plan):
    fp32 = qgraph.transform(make_llama(), plan, kv_cache=False)
    bf16 = qgraph.transform(make_llama(), plan, dtype=BF16, kv_cache=False)
    cast_first = qgraph.transform(make_llama().to(BF16), plan, kv_cache=False)
    quantized = [name for name, t in fp32.graph_module.state_dict().items()
                 if "phi0" in name or "scale" in name or "nf4_packed" in name or "nf4_absmax" in name]
    assert quantized
    ours, theirs, cast = fp32.graph_module.state_dict(), bf16.graph_module.state_dict(), cast_first.graph_module.state_dict()
    for name in quantized:
        assert torch.equal(ours[name], theirs[name]), name
    # the bf16 cast of the weights quantizes otherwise somewhere: what reading the originals buys
    assert any(not torch.equal(ours[name].to(cast[name].dtype), cast[name]) for name in quantized)


@pytest.mark.parametrize(("plan", "options"), [("lrqat-w4", {}), ("qst-nf4", {}),
                                               ("qst-nf4", {"compute_dtype": "backbone"})])
def test_bf16_training_lowers_the_loss_with_float32_trainable_tensors(plan, options):
    qm = qgraph.transform(make_llama(), plan, dtype=BF16, kv_cache=False, **options)
    ids = random_ids((2, 16))
    start = qm(input_ids=ids, labels=ids).loss.item()
    train_steps(qm, ids, steps=8, lr=3e-3)
    assert qm(input_ids=ids, labels=ids).loss.item() < start
    assert {p.dtype for p in qm.trainable_parameters()} == {torch.float32}


def test_side_network_computes_in_float32_by_default_and_in_bf16_when_asked():
    default = side_network(qgraph.transform(make_llama(), "qst-nf4", dtype=BF16, kv_cache=False))
    assert default.compute_dtype is None and default.upsample.weight.dtype == torch.float32
    side = side_network(qgraph.transform(make_llama(), "qst-nf4", dtype=BF16, kv_cache=False,
                                         compute_dtype="backbone"))
    assert side.compute_dtype == BF16 and side.upsample.weight.dtype == torch.float32
    taps = [torch.randn(2, 5, side.config.backbone_width, dtype=BF16) for _ in range(side.config.blocks + 1)]
    with torch.no_grad():
        ours = side.side_output(None, *taps)
        side.compute_dtype = None
        fp32 = side.side_output(None, *taps)
    assert ours.dtype == BF16 and fp32.dtype == torch.float32
    torch.testing.assert_close(ours.float(), fp32, rtol=5e-2, atol=5e-2)


def test_an_unknown_side_compute_dtype_is_refused():
    with pytest.raises(PlanError, match="compute_dtype must be one of float32, backbone"):
        qgraph.transform(make_llama(), "qst-nf4", compute_dtype="bf16")


def test_step_zero_equals_the_nf4_backbone_in_bf16():
    ids = random_ids((2, 10))
    nf4 = qgraph.transform(make_llama(), "nf4", dtype=BF16, kv_cache=False)
    qst = qgraph.transform(make_llama(), "qst-nf4", dtype=BF16, kv_cache=False)
    assert torch.equal(qst(input_ids=ids).logits, nf4(input_ids=ids).logits)


def test_cached_generation_in_bf16_equals_recomputed():
    qm = qgraph.transform(make_llama(), "lrqat-w4", dtype=BF16)
    prompt = random_ids((2, 6))
    cached = qm.generate(prompt, max_new_tokens=6)
    assert torch.equal(cached, qm.generate(prompt, max_new_tokens=6, use_cache=False))


def test_save_and_load_keep_the_dtype(tmp_path):
    ids = random_ids((2, 10))
    qm = train_steps(qgraph.transform(make_llama(), "lrqat-w4", dtype=BF16, kv_cache=False), ids, steps=2, lr=1e-3)
    qm.save_pretrained(tmp_path)
    loaded = qgraph.from_pretrained(make_llama(), tmp_path)
    assert loaded.info.cast_to == BF16
    assert torch.equal(loaded(input_ids=ids).logits, qm(input_ids=ids).logits)
    with pytest.raises(PretrainedError, match="dtype=bfloat16, this one with dtype=None"):
        qgraph.from_pretrained(qgraph.transform(make_llama(), "lrqat-w4", kv_cache=False), tmp_path)


@pytest.mark.parametrize("field", ["no_such_dtype", "Tensor", 16])
def test_a_damaged_dtype_field_is_refused_naming_the_field(tmp_path, field):
    import json

    from qgraph.saved_state import CONFIG_FILE

    qgraph.transform(make_llama(), "lrqat-w4", dtype=BF16, kv_cache=False).save_pretrained(tmp_path)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    meta["dtype"] = field
    (tmp_path / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(PretrainedError, match=f'"dtype" field is {field!r}, not the name of a torch dtype'):
        qgraph.from_pretrained(make_llama(), tmp_path)


def test_bad_dtypes_are_refused_before_capture(snapshot):
    model = make_llama()
    before = snapshot(model)
    with pytest.raises(QGraphError, match=r"dtype=torch.int8 is not a dtype qgraph trains in; choose one of"):
        qgraph.transform(model, "nf4", dtype=torch.int8)
    with pytest.raises(TypeError, match=r"pass the torch dtype \(torch.bfloat16\), not its name"):
        qgraph.transform(model, "nf4", dtype="bfloat16")
    before.assert_unchanged(model)


@pytest.mark.parametrize("has_bf16_units", [False, True])
def test_bf16_on_a_cpu_without_bf16_units_warns_and_names_float32(monkeypatch, has_bf16_units):
    """Without AVX512-BF16/AMX a bf16 model trains ~10x slower than a float32 one: transform says so (and still
    transforms); with them, or in float32, it says nothing."""
    import warnings

    monkeypatch.setattr(qgraph.cast, "cpu_has_bf16_matmul", lambda: has_bf16_units)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qm = qgraph.transform(make_llama(), "nf4", dtype=torch.bfloat16)
        qgraph.transform(make_llama(), "nf4")
    slow = [w for w in caught if "bf16 matrix units" in str(w.message)]
    assert len(slow) == (0 if has_bf16_units else 1)
    if slow:
        assert "Train in float32 (dtype=None)" in str(slow[0].message) and slow[0].filename == __file__
    assert qm(input_ids=random_ids((1, 8))).logits.dtype == torch.bfloat16
