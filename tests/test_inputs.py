"""Bad input is a clear error that names the argument and the fix, raised before anything changes."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import qgraph
from qgraph.errors import PlanError, QGraphError
from qgraph.models import tiny_sequence_classifier
from tests.conftest import VOCAB, make_llama, random_ids


@pytest.fixture(scope="module")
def lrqat_llama() -> qgraph.QGraphModule:
    return qgraph.transform(make_llama(), "lrqat-w4")


# --- the model --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("plan", ["nf4", "lrqat-w4"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_weight_names_its_layer_and_count(plan, value, snapshot):
    model = make_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, :2] = value
    before = snapshot(model)
    with pytest.raises(QGraphError, match=r"model\.layers\.1\.mlp\.up_proj\.weight holds 2 non-finite value\(s\) "
                                          r"\(NaN or inf\) in layer 'model\.layers\.1\.mlp\.up_proj'"):
        qgraph.transform(model, plan)
    before.assert_unchanged(model)


def test_a_model_on_the_meta_device_is_refused_with_the_fix():
    with torch.device("meta"):
        model = make_llama()
    with pytest.raises(QGraphError, match=r"on the meta device \(not materialized\).*model\.embed_tokens\.weight.*"
                                          r"to_empty"):
        qgraph.transform(model, "nf4")


class MatmulMLP(nn.Module):
    """Linears written as `x @ W.T` and `torch.matmul(x, W.t())`, as some families' custom linear classes do."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.up = nn.Parameter(torch.randn(128, 64, generator=generator) / 8)
        self.down = nn.Parameter(torch.randn(64, 128, generator=generator) / 11)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.relu(x @ self.up.T), self.down.t())


@pytest.mark.parametrize("plan", ["nf4", "lrqat-w4"])
@pytest.mark.parametrize("example", [False, True], ids=["torch.fx", "torch.export"])
def test_matmul_against_a_transposed_weight_is_a_linear_site(plan, example):
    model = MatmulMLP()
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    qm = qgraph.transform(model, plan, example_inputs=(x,) if example else None)
    assert sum(len(p.rewritten) for p in qm.report.passes) == 2
    assert any("no decoder blocks found" in note for p in qm.report.passes for note in p.notes)
    ops = {str(n.target) for n in qm.graph_module.graph.nodes if n.op == "call_function"}
    assert not ops & {"<built-in function matmul>", "aten.matmul.default", "aten.t.default", "aten.numpy_T.default"}
    expected = model(x)
    relative = ((qm(x) - expected).norm() / expected.norm()).item()
    assert 0 < relative < 0.2  # 4-bit weights of random Gaussians: close to the original, not equal
    if plan == "lrqat-w4":
        assert qm.report.trainable_params > 0


def test_a_plan_that_rewrites_nothing_says_which_linear_forms_it_looked_for(snapshot):
    model = nn.Sequential(nn.Conv1d(4, 4, 1), nn.ReLU())
    before = snapshot(model)
    with pytest.raises(PlanError, match=r"plan 'lrqat-w4' rewrote nothing: no linear layer was found; it looks for "
                                        r"nn\.Linear modules.*x @ W\.T"):
        qgraph.transform(model, "lrqat-w4")
    before.assert_unchanged(model)


def test_a_plan_whose_globs_select_no_layer_names_them_and_the_layers_there_are():
    with pytest.raises(PlanError, match=r"plan 'nf4' rewrote nothing: exclude=\['\*'\] left none of the graph's "
                                        r"\d+ linear layers selected \(e\.g\. model\.layers\.0\.self_attn\.q_proj"):
        qgraph.transform(make_llama(), "nf4", exclude=["*"])


@pytest.mark.parametrize(("plan", "options", "named"), [
    ("nf4", {"include": ["nothing.*"]}, "quantize_nf4: include glob 'nothing.*'"),
    # the typo beside a glob that does select: it would silently select less
    ("nf4", {"include": ["*.mlp.*", "model.layer.*.self_attn.*"]}, "include glob 'model.layer.*.self_attn.*'"),
    # an exclude that excludes nothing would quantize the layers it was meant to keep out
    ("lrqat-w4", {"exclude": ["model.layer.*.mlp.*"]}, "lrqat: exclude glob 'model.layer.*.mlp.*'"),
    ("lrqat-w4a8", {"fake_quant_activations.exclude": ["*.down"]}, "fake_quant_activations: exclude glob '*.down'"),
    ("nf4", {"exclude": "[*.mlp.*]"}, r"exclude glob '[*.mlp.*]'"),  # the CLI's --set exclude=[*.mlp.*], unquoted
])
def test_a_glob_that_names_no_linear_layer_is_refused_before_any_pass(plan, options, named, snapshot):
    model = make_llama()
    before = snapshot(model)
    with pytest.raises(PlanError, match=re.escape(named) + r" names none of the graph's \d+ linear layers "
                                        r"\(e\.g\. model\.layers\.0\.self_attn\.q_proj"):
        qgraph.transform(model, plan, **options)
    before.assert_unchanged(model)


def test_globs_that_each_name_a_layer_are_taken():
    qm = qgraph.transform(make_llama(), "lrqat-w4", include=["*.mlp.*", "*.q_proj"], exclude=["*.down_proj"])
    rewritten = {record.path for record in qm.report.passes[0].rewritten}
    assert rewritten and all(p.endswith(("gate_proj", "up_proj", "q_proj")) for p in rewritten)


# --- the call ---------------------------------------------------------------------------------------------


def test_labels_of_another_shape_name_both_shapes(lrqat_llama):
    ids = random_ids((2, 16))
    with pytest.raises(QGraphError, match=r"labels has shape \(2, 15\) but input_ids has \(2, 16\)"):
        lrqat_llama(input_ids=ids, labels=ids[:, :15])


def test_labels_outside_the_vocabulary_or_not_integers_are_refused_before_the_forward(lrqat_llama, monkeypatch):
    ids = random_ids((2, 16))
    labels = ids.clone()
    labels[0, :3] = -100  # skipped positions are fine
    loss = lrqat_llama(input_ids=ids, labels=labels).loss
    # int32 ids are the int64 ids they mean, as masks are
    assert torch.equal(lrqat_llama(input_ids=ids, labels=labels.int()).loss, loss)
    monkeypatch.setattr(lrqat_llama, "_run", lambda **kwargs: pytest.fail("the forward ran"))
    labels[1, 4] = VOCAB + 7
    with pytest.raises(QGraphError, match=rf"labels holds {VOCAB + 7}, neither a token id of the model's vocabulary "
                                          rf"\(0\.\.{VOCAB - 1}\) nor -100"):
        lrqat_llama(input_ids=ids, labels=labels)
    with pytest.raises(TypeError, match=r"labels must hold integer token ids .* got torch\.float32"):
        lrqat_llama(input_ids=ids, labels=ids.float())


def test_a_classifiers_labels_are_one_class_per_sequence_below_num_labels():
    classifier = qgraph.transform(tiny_sequence_classifier("llama", layers=1, num_labels=3), "nf4")
    ids = random_ids((2, 8))
    with pytest.raises(QGraphError, match=r"labels holds class 7, but the classifier has num_labels=3 "
                                          r"\(classes 0\.\.2\)"):
        classifier(input_ids=ids, labels=torch.tensor([0, 7]))
    with pytest.raises(QGraphError, match=r"integer labels are one class per sequence, shape \(2,\)"):
        classifier(input_ids=ids, labels=ids)
    loss = classifier(input_ids=ids, labels=torch.tensor([0, 2])).loss
    assert torch.isfinite(loss)
    assert torch.equal(classifier(input_ids=ids, labels=torch.tensor([[0], [2]])).loss, loss)  # (batch, 1) as HF


@pytest.mark.parametrize(("num_labels", "labels"), [
    (1, torch.tensor([1, 2])),  # regression takes integer targets too (HF's MSE loss)
    (3, torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])),  # multi-label targets are floats
])
def test_regression_and_multi_label_targets_go_to_the_models_own_loss(num_labels, labels):
    classifier = qgraph.transform(tiny_sequence_classifier("llama", layers=1, num_labels=num_labels), "nf4")
    assert torch.isfinite(classifier(input_ids=random_ids((2, 8)), labels=labels).loss)


def test_an_attention_mask_of_another_shape_names_both_shapes(lrqat_llama):
    ids = random_ids((2, 16))
    with pytest.raises(QGraphError, match=r"attention_mask has shape \(2, 12\) but input_ids has \(2, 16\)"):
        lrqat_llama(input_ids=ids, attention_mask=torch.ones(2, 12, dtype=torch.long))


def test_a_token_id_outside_the_vocabulary_names_the_id_its_position_and_the_vocab(lrqat_llama):
    ids = random_ids((2, 16))
    ids[1, 7] = VOCAB + 3
    with pytest.raises(QGraphError, match=rf"token id {VOCAB + 3} at \(batch 1, position 7\), outside the model's "
                                          rf"vocabulary of {VOCAB}"):
        lrqat_llama(input_ids=ids)
    ids[1, 7] = -1
    with pytest.raises(QGraphError, match=r"token id -1 at \(batch 1, position 7\)"):
        lrqat_llama.next_token_logits(ids)


def test_float_input_ids_name_the_dtypes_accepted(lrqat_llama):
    with pytest.raises(TypeError, match=r"input_ids must hold torch\.int64 token ids \(the dtype the "
                                        r"graph was captured with\), got torch\.float32"):
        lrqat_llama(input_ids=random_ids((2, 16)).float())


def test_a_float_attention_mask_is_refused(lrqat_llama):
    ids = random_ids((2, 16))
    with pytest.raises(TypeError, match="attention_mask must hold integers"):
        lrqat_llama(input_ids=ids, attention_mask=torch.ones(2, 16))


def test_int32_ids_are_refused_with_the_cast_that_fixes_them(lrqat_llama):
    with pytest.raises(TypeError, match=r"input_ids must hold torch\.int64 token ids.*got torch\.int32.*ids\.long\(\)"):
        lrqat_llama(input_ids=random_ids((2, 16)).int())


def test_a_bool_or_int32_attention_mask_is_taken_as_the_int64_mask_it_means(lrqat_llama):
    ids = random_ids((2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    with torch.no_grad():
        expected = lrqat_llama(input_ids=ids, attention_mask=mask).logits
        for other in (mask.bool(), mask.int()):
            assert torch.equal(lrqat_llama(input_ids=ids, attention_mask=other).logits, expected)


# --- transform's arguments --------------------------------------------------------------------------------


def test_transform_takes_a_module_and_not_one_it_made(lrqat_llama):
    with pytest.raises(TypeError, match=r"transform takes a torch\.nn\.Module, got str \(a checkpoint name: load it "
                                        r"first"):
        qgraph.transform("HuggingFaceTB/SmolLM2-135M", "nf4")
    with pytest.raises(TypeError, match="got NoneType"):
        qgraph.transform(None, "nf4")
    for made in (lrqat_llama, lrqat_llama.graph_module):
        with pytest.raises(QGraphError, match=r"made by qgraph \(transform or capture\) already; transform the "
                                              r"original model"):
            qgraph.transform(made, "nf4")


@pytest.mark.parametrize(("arguments", "message"), [
    ({"skip": "quantize_nf4"}, r"skip takes a list of pass names, e\.g\. skip=\['quantize_nf4'\]; got 'quantize_nf4'"),
    ({"print_after": [1]}, r"print_after takes a list of pass names.*got \[1\]"),
    ({"kv_cache": "no"}, "kv_cache must be True or False, got 'no'"),
])
def test_transform_refuses_arguments_of_the_wrong_type(arguments, message, snapshot):
    model = make_llama()
    before = snapshot(model)
    with pytest.raises(TypeError, match=message):
        qgraph.transform(model, "nf4", **arguments)
    before.assert_unchanged(model)


@pytest.mark.parametrize(("options", "message"), [
    ({"blocksize": 64.0}, r"blocksize=64\.0 is not one bitsandbytes supports; use one of \(64, .*\), an int"),
    ({"blocksize": "64"}, r"blocksize='64' is not one"),
    ({"include": [5]}, r"module-path globs must be a string or a list of strings .* got \[5\]"),
    ({"exclude": 5}, r"module-path globs must be .* got 5"),
])
def test_nf4_options_of_the_wrong_type_are_plan_errors(options, message):
    with pytest.raises(PlanError, match=message):
        qgraph.transform(make_llama(), "nf4", **options)


def test_a_float64_model_quantizes_to_nf4_from_its_float32_rounding():
    model = make_llama().double()
    ids = random_ids((2, 8))
    with torch.no_grad():
        ours = qgraph.transform(model, "nf4")(input_ids=ids).logits
        theirs = qgraph.transform(model, "nf4", dtype=torch.float32)(input_ids=ids).logits
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-4, atol=1e-4)


def test_a_plain_module_fed_integers_is_refused_not_zeroed():
    qm = qgraph.transform(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)), "nf4")
    with pytest.raises(TypeError, match=r"nf4_linear takes floating-point activations, got torch\.int64"):
        qm(torch.randint(-3, 4, (3, 64)))


def test_a_transformed_module_moves_between_devices_but_refuses_a_dtype_cast(lrqat_llama):
    ids = random_ids((2, 8))
    for cast, new in ((lambda: lrqat_llama.to(torch.bfloat16), "bfloat16"), (lrqat_llama.half, "float16"),
                      (lambda: nn.ModuleDict({"qm": lrqat_llama}).bfloat16(), "bfloat16")):  # through a parent too
        with pytest.raises(QGraphError, match=rf"would change them \(torch\.float32 -> torch\.{new}\); transform "
                                              rf"the model in that dtype instead: .*dtype=torch\.{new}\)"):
            cast()
    with pytest.raises(QGraphError, match=r"float32 -> torch\.float64\); qgraph trains in torch\.float32, "):
        lrqat_llama.double()
    # the same dtype, or a device, is no cast
    assert lrqat_llama.to("cpu").float().to(torch.float32).to(ids.float()) is lrqat_llama
    assert {p.dtype for p in lrqat_llama.parameters()} == {torch.float32}
    assert lrqat_llama(input_ids=ids).logits.shape == (2, 8, VOCAB)


def test_a_bf16_module_cast_to_bf16_is_told_it_computes_in_bf16_already():
    # its NF4 statistics stay float32: casting them to bf16 gave NaN logits
    qm = qgraph.transform(make_llama(), "nf4", dtype=torch.bfloat16)
    with pytest.raises(QGraphError, match=r"float32 -> torch\.bfloat16\); it already computes in torch\.bfloat16 "
                                          r"\(its torch\.float32 tensors stay so on purpose\): drop the cast"):
        qm.to(torch.bfloat16)
    assert torch.isfinite(qm(input_ids=random_ids((2, 8))).logits).all()


def test_a_plan_json_without_passes_is_a_plan_error():
    with pytest.raises(PlanError, match=r"not a plan's JSON \(KeyError: 'passes'\)"):
        qgraph.Plan.from_json("{}")
    with pytest.raises(PlanError, match=r"not a plan's JSON \(JSONDecodeError"):
        qgraph.Plan.from_json("nf4")


def test_skip_none_skips_nothing():
    assert qgraph.transform(make_llama(), "nf4", skip=None, print_after=None).report.passes[0].rewritten
