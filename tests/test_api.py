import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qgraph
from qgraph.capture import MAX_BATCH
from qgraph.graph import count_ops
from qgraph.models import tiny_sequence_classifier
from qgraph.ops.nf4 import decode_nf4, quantize_nf4
from tests.conftest import make_llama

NF4 = torch.ops.qgraph.nf4_linear
aten = torch.ops.aten


def shifted_cross_entropy(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


# --- the module -----------------------------------------------------------------------------------------


def test_transform_returns_a_frozen_qgraph_module(llama_nf4):
    model, qm = llama_nf4
    assert isinstance(qm, qgraph.QGraphModule) and isinstance(qm, nn.Module)
    assert qm.info.kind == "hf" and qm.plan.name == "nf4"
    assert qm.trainable_parameters() == []
    assert qm.report.trainable_params == 0
    assert qm.report.frozen_params == sum(p.numel() for p in qm.parameters()) == 2 * 256 * 64 + 5 * 64


def test_train_and_eval_set_every_submodule(tiny_llama, make_ids):
    qm = qgraph.transform(tiny_llama, "nf4")
    qm.eval()  # fresh objects from torch.export refuse .train(); QGraphModule sets the flag itself
    assert not any(m.training for m in qm.modules())
    assert qm.train() is qm and all(m.training for m in qm.modules())
    ids = make_ids((2, 8), seed=3)
    assert torch.isfinite(qm(input_ids=ids, labels=ids).loss)


def test_report_names_every_site(llama_nf4):
    _, qm = llama_nf4
    sites = [f"model.layers.{layer}.{name}" for layer in range(2)
             for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert [r.path for r in qm.report["quantize_nf4"].records] == sites
    text = str(qm.report)
    assert text.startswith("qgraph plan nf4")
    # the rendering groups a decoder block's sites on one row
    rows = [line for line in text.splitlines() if "model.layers." in line]
    assert [row.split()[1] for row in rows] == ["model.layers.0", "model.layers.1"]
    assert all("rewritten" in row and " 7 " in row for row in rows)
    assert "lm_head" not in text


def test_report_str_names_skipped_sites_and_why(tiny_gpt2):
    qm = qgraph.transform(tiny_gpt2, "nf4", include=("lm_head", "transformer.h.0.*"))
    text = str(qm.report)
    assert "skipped lm_head: weight lm_head.weight is also read by" in " ".join(text.split())
    assert "(tied)" in text
    assert "transformer.h.0" in text


def test_attention_mask_defaults_to_ones(llama_nf4, make_ids):
    _, qm = llama_nf4
    ids = make_ids((2, 6))
    with torch.no_grad():
        assert torch.equal(qm(input_ids=ids).logits, qm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits)
        assert torch.equal(qm(ids).logits, qm(input_ids=ids).logits)


# --- losses ---------------------------------------------------------------------------------------------


def test_labels_give_the_hf_loss(llama_nf4, make_ids):
    model, qm = llama_nf4
    ids = make_ids((3, 9), seed=5)
    labels = ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        out = qm(input_ids=ids, labels=labels)
    assert out.loss.shape == ()
    # the model's own loss function, on the quantized logits
    hf = model.loss_function(logits=out.logits, labels=labels, vocab_size=model.config.vocab_size)
    torch.testing.assert_close(out.loss, hf, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, shifted_cross_entropy(out.logits, labels), rtol=0, atol=1e-6)
    with torch.no_grad():
        original = model(input_ids=ids, labels=labels, use_cache=False).loss
    assert abs(out.loss.item() - original.item()) < 0.05  # NF4 moves the loss a little, not a lot
    assert out.loss.item() != original.item()


def test_skipping_the_pass_reproduces_the_model_exactly(tiny_llama, make_ids):
    qm = qgraph.transform(tiny_llama, "nf4", skip=["quantize_nf4"])
    ids = make_ids((2, 12), seed=6)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = qm(input_ids=ids, attention_mask=mask, labels=labels)
        ref = tiny_llama(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.loss, ref.loss)


def test_sequence_classifier_loss(make_ids):
    model = tiny_sequence_classifier("llama", num_labels=3)
    qm = qgraph.transform(model, "nf4", skip=["quantize_nf4"])
    ids, labels = make_ids((4, 7), seed=7), torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        out, ref = qm(input_ids=ids, labels=labels), model(input_ids=ids, labels=labels, use_cache=False)
    assert out.logits.shape == (4, 3)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)


def test_unexpected_keyword_is_a_type_error(llama_nf4, make_ids):
    _, qm = llama_nf4
    with pytest.raises(TypeError, match=r"got unexpected arguments \['position_ids'\]"):
        qm(input_ids=make_ids((1, 3)), position_ids=torch.arange(3)[None])


# --- shapes outside the captured range -------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 513), (MAX_BATCH + 1, 4)])
def test_shape_outside_the_captured_range(llama_nf4, shape):
    _, qm = llama_nf4
    with pytest.raises(qgraph.QGraphError) as err:
        qm(input_ids=torch.ones(shape, dtype=torch.long))
    assert str(err.value) == (
        f"input_ids shape {shape} is outside the captured range (batch 1..{MAX_BATCH}, seq 1..512); "
        "split the batch or shorten the text")


def test_input_ids_must_be_two_dimensional(llama_nf4):
    _, qm = llama_nf4
    with pytest.raises(qgraph.QGraphError, match=r"input_ids must be \(batch, seq\); got shape \(5,\)"):
        qm(input_ids=torch.ones(5, dtype=torch.long))


def test_range_edges_still_run(llama_nf4, make_ids):
    _, qm = llama_nf4
    with torch.no_grad():
        assert qm(input_ids=make_ids((1, 512))).logits.shape == (1, 512, 256)
        assert qm(input_ids=make_ids((MAX_BATCH, 1))).logits.shape == (MAX_BATCH, 1, 256)


# --- re-export and compile -------------------------------------------------------------------------------


def test_transformed_graph_re_exports(llama_nf4, make_ids):
    _, qm = llama_nf4
    example = qm.info.example_inputs
    assert set(example) == {"input_ids", "attention_mask", "use_cache"} and example["use_cache"] is False
    program = torch.export.export(qm.graph_module, (), kwargs=example, strict=False)
    nf4_nodes = [n for n in program.graph.nodes if n.target == NF4.default]
    assert len(nf4_nodes) == 14
    assert sum(1 for n in program.graph.nodes if n.target == aten.linear.default) == 1
    with torch.no_grad():
        again = program.module()(**example).logits
        assert torch.equal(again, qm.graph_module(**example).logits)
        ids = make_ids(tuple(example["input_ids"].shape), seed=8)
        assert torch.equal(program.module()(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits,
                           qm(input_ids=ids).logits)


def test_plain_module_transform_runs_positionally():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8))
    x = torch.randn(5, 64)
    expected = model(x).detach()
    qm = qgraph.transform(model, "nf4", include=("*",), example_inputs=(torch.randn(2, 64),))
    assert qm.info.kind == "module"
    assert count_ops(qm.graph_module)[NF4] == 2
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for linear in (reference[0], reference[2]):
            q = quantize_nf4(linear.weight)
            linear.weight.copy_(decode_nf4(q.packed, q.absmax, q.code, q.nested_absmax, q.nested_code, q.offset,
                                           *q.shape, q.blocksize, q.nested_blocksize))
        out = qm(x)
        assert out.shape == (5, 8)
        torch.testing.assert_close(out, reference(x), rtol=0, atol=1e-5)
        assert (out - expected).abs().max() > 1e-3


@pytest.mark.slow
def test_torch_compile_matches_eager(llama_nf4, make_ids):
    model, eager = llama_nf4
    compiled = qgraph.transform(model, "nf4", compile=True)
    for shape in [(2, 9), (3, 13)]:
        ids = make_ids(shape, seed=shape[1])
        with torch.no_grad():
            torch.testing.assert_close(compiled(input_ids=ids).logits, eager(input_ids=ids).logits,
                                       rtol=0, atol=1e-5)


@pytest.mark.parametrize(("plan", "seed_option"), [("lrqat-w4", "lrqat.seed"), ("qst-nf4", "attach_side_taps.seed")])
def test_new_parameters_come_from_the_plans_seed_not_the_global_rng(plan, seed_option):
    model = make_llama()

    def state(**options):
        return {k: v.clone() for k, v in qgraph.transform(model, plan, **options).state_dict().items()}

    torch.manual_seed(1)
    first = state()
    torch.manual_seed(2)  # torch seeds its global RNG at random in each process: this stands for that
    assert all(torch.equal(first[k], v) for k, v in state().items())
    reseeded = state(**{seed_option: 1})
    assert any(not torch.equal(first[k], v) for k, v in reseeded.items())
