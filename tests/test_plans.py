import json

import pytest
import torch

import qgraph
from qgraph.errors import closest_first, unknown_name_message
from qgraph.graph import count_ops
from qgraph.plans import PLANS, PassConfig, Plan, get_plan, resolve_steps

from passes import get_pass
from passes.quantize_nf4 import BNB_BLOCKSIZES, NF4Options

NF4 = torch.ops.qgraph.nf4_linear
aten = torch.ops.aten


def listed(message: str) -> list[str]:
    """The names a `... (closest first): a, b, c` message lists, in order."""
    tail = message.split("(closest first): ", 1)[1]
    return tail.split(" (plan ")[0].split(", ")


# --- the plan registry -------------------------------------------------------------------------------


def test_plans_lists_nf4():
    names = qgraph.plans()
    assert "nf4" in names
    assert names == sorted(PLANS)
    nf4 = get_plan("nf4")
    assert nf4.passes == (PassConfig("quantize_nf4"),)
    assert get_plan(nf4) is nf4


def test_unknown_plan_lists_valid_plans_closest_first():
    with pytest.raises(qgraph.PlanError) as err:
        get_plan("nf5")
    message = str(err.value)
    assert message.startswith("unknown plan 'nf5'; valid plans (closest first): ")
    assert listed(message)[0] == "nf4"
    assert sorted(listed(message)) == qgraph.plans()
    assert isinstance(err.value, qgraph.QGraphError)


def test_closest_first_orders_by_similarity_and_keeps_every_choice():
    choices = ["exclude", "include", "double_quant", "blocksize", "quantize_nf4.blocksize"]
    ordered = closest_first("blocksise", choices)
    assert ordered[:2] == ["blocksize", "quantize_nf4.blocksize"]
    assert sorted(ordered) == sorted(choices) and len(ordered) == len(set(ordered))
    assert closest_first("includ", choices)[0] == "include"
    assert sorted(closest_first("zzzz", ["b", "a", "b"])) == ["a", "b"]  # nothing similar: all, once
    assert unknown_name_message("format", "int", ["int4", "fp32"]) == \
        "unknown format 'int'; valid formats (closest first): int4, fp32"


# --- options ---------------------------------------------------------------------------------------------


def test_unknown_option_lists_valid_options_closest_first():
    with pytest.raises(qgraph.PlanError) as err:
        resolve_steps(get_plan("nf4"), {"blocksise": 64})
    message = str(err.value)
    assert message.startswith("unknown option 'blocksise'")
    assert message.endswith("(plan 'nf4')")
    names = listed(message)
    assert names[0] == "blocksize"
    options = ["blocksize", "double_quant", "include", "exclude"]
    assert sorted(names) == sorted(options + [f"quantize_nf4.{o}" for o in options])


def test_unknown_qualified_option_names_the_pass_options():
    with pytest.raises(qgraph.PlanError) as err:
        resolve_steps(get_plan("nf4"), {"quantize_nf5.blocksize": 128})
    assert listed(str(err.value))[0] == "quantize_nf4.blocksize"


def test_overrides_reach_the_pass_options():
    [(spec, options)] = resolve_steps(get_plan("nf4"), {"blocksize": 256, "exclude": "*.mlp.*"})
    assert spec is get_pass("quantize_nf4")
    assert options == NF4Options(blocksize=256, double_quant=True, include=None, exclude=("*.mlp.*",))
    [(_, options)] = resolve_steps(get_plan("nf4"), {"quantize_nf4.double_quant": False, "include": ["a", "b"]})
    assert options.double_quant is False and options.include == ("a", "b")


@pytest.mark.parametrize("blocksize", [100, 32, 0])
def test_unsupported_blocksize_names_the_supported_ones(blocksize):
    with pytest.raises(qgraph.PlanError) as err:
        resolve_steps(get_plan("nf4"), {"blocksize": blocksize})
    message = str(err.value)
    assert message.startswith(f"pass 'quantize_nf4': blocksize={blocksize} is not one bitsandbytes supports")
    assert str(BNB_BLOCKSIZES) in message
    assert BNB_BLOCKSIZES == (64, 128, 256, 512, 1024, 2048, 4096)


def test_unknown_pass_in_a_plan():
    with pytest.raises(qgraph.PlanError, match=r"unknown pass 'quantise_nf4'; .*: quantize_nf4"):
        resolve_steps(Plan("typo", "", (PassConfig("quantise_nf4"),)), {})


@pytest.mark.parametrize(("build", "message"), [
    (lambda: Plan("x", "", ("lrqat",)), r"passes are a tuple of PassConfig .* got \('lrqat',\)"),
    (lambda: Plan("x", "", ({"name": "lrqat"},)), "passes are a tuple of PassConfig"),
    (lambda: Plan("x", "", PassConfig("lrqat")), "passes are a tuple of PassConfig"),
    (lambda: PassConfig("quantize_nf4", None), "pass 'quantize_nf4': options are a dict"),
    (lambda: PassConfig(get_pass("lrqat")), "a pass is named by a string"),
])
def test_a_malformed_plan_is_refused_where_it_is_built(build, message):
    with pytest.raises(qgraph.PlanError, match=message):
        build()


def test_a_list_of_passes_is_taken_as_the_tuple_it_means():
    assert Plan("x", "", [PassConfig("lrqat")]).passes == (PassConfig("lrqat"),)


@pytest.mark.parametrize(("passes", "message"), [
    ((), "plan 'custom' has no passes"),
    ((PassConfig("insert_checkpoints"), PassConfig("lrqat")),
     "plan 'custom' runs lrqat after insert_checkpoints, whose regions hide the decoder blocks"),
    ((PassConfig("quantize_nf4"), PassConfig("lrqat")),
     "plan 'custom': lrqat found no linear layer to rewrite among those quantize_nf4 before it left"),
])
def test_a_plan_whose_passes_cannot_all_work_is_refused(tiny_llama, snapshot, passes, message):
    before = snapshot(tiny_llama)
    with pytest.raises(qgraph.PlanError, match=message):
        qgraph.transform(tiny_llama, Plan("custom", "", passes))
    before.assert_unchanged(tiny_llama)


def test_two_linear_passes_over_disjoint_layers_both_rewrite(tiny_llama):
    plan = Plan("split", "", (PassConfig("quantize_nf4", {"include": ["*.self_attn.*"]}),
                              PassConfig("lrqat", {"include": ["*.mlp.*"]})))
    report = qgraph.transform(tiny_llama, plan).report
    assert len(report["quantize_nf4"].rewritten) and len(report["lrqat"].rewritten)


# --- errors raise before anything changes ---------------------------------------------------------------


BAD_CALLS = {
    "unknown plan": ({"plan": "nf5"}, "unknown plan 'nf5'; valid plans (closest first): nf4"),
    "unknown option": ({"blocksise": 64}, "unknown option 'blocksise'; valid options (closest first): blocksize, "),
    "bad blocksize": ({"blocksize": 100}, "blocksize=100 is not one bitsandbytes supports; use one of (64, 128,"),
    "unknown skip": ({"skip": ["quantize_nf5"]}, "(closest first): quantize_nf4 (plan 'nf4')"),
    "unknown print_after": ({"print_after": ["quantize"]}, "unknown pass 'quantize'; valid pass"),
    "checkpoint": ({"checkpoint": "layers"}, "checkpoint='layers' is not valid: unknown checkpoint value 'layers'; "
                   "valid checkpoint values (closest first): "),
    "checkpoint type": ({"checkpoint": 2}, 'checkpoint=2 is not valid: use one of "blocks" (a region per decoder '
                        'block), "none" (no checkpoints), {"every": k}'),
    "checkpoint option": ({"checkpoint": {"evry": 2}}, "checkpoint={'evry': 2}: unknown option 'evry'; valid "
                          "options (closest first): every, "),
    "checkpoint every": ({"checkpoint": {"every": 0}}, "every must be a positive integer (blocks per checkpoint "
                         "region), got 0"),
    "checkpoint skip": ({"plan": "lrqat-w4", "checkpoint": "none", "skip": ["insert_checkpoints"]},
                        "unknown pass 'insert_checkpoints'; valid passes (closest first): "),
}


@pytest.mark.parametrize("kwargs, expected", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_arguments_raise_before_the_model_changes(tiny_llama, snapshot, kwargs, expected):
    before = snapshot(tiny_llama)
    with pytest.raises(qgraph.PlanError) as err:
        qgraph.transform(tiny_llama, **kwargs)
    assert expected in str(err.value)
    before.assert_unchanged(tiny_llama)


def test_unknown_pass_message_is_spelled_right(tiny_llama):
    with pytest.raises(qgraph.PlanError, match="valid passes"):
        qgraph.transform(tiny_llama, skip=["quantize_nf5"])


# --- serialisation -------------------------------------------------------------------------------------


def test_builtin_plan_json_round_trip():
    for name in qgraph.plans():
        plan = get_plan(name)
        text = plan.to_json()
        assert Plan.from_json(text) == plan
        assert json.loads(text)["passes"][0]["name"] == plan.passes[0].name


def test_custom_plan_json_round_trip_drives_transform(tiny_llama):
    plan = Plan("attn-nf4-128", "attention only, blocksize 128",
                (PassConfig("quantize_nf4", {"blocksize": 128, "exclude": ["*.mlp.*"]}),))
    data = json.loads(plan.to_json())
    assert data == {"name": "attn-nf4-128", "description": "attention only, blocksize 128",
                    "passes": [{"name": "quantize_nf4", "options": {"blocksize": 128, "exclude": ["*.mlp.*"]}}]}
    loaded = Plan.from_json(plan.to_json())
    assert loaded == plan
    assert Plan.from_json('{"name": "bare", "passes": [{"name": "quantize_nf4"}]}') == \
        Plan("bare", "", (PassConfig("quantize_nf4", {}),))
    qm = qgraph.transform(tiny_llama, loaded)
    assert qm.plan == plan and qm.report.plan == "attn-nf4-128"
    report = qm.report["quantize_nf4"]
    assert report.options["blocksize"] == 128 and report.options["exclude"] == ("*.mlp.*",)
    counts = count_ops(qm.graph_module)
    assert counts[NF4] == 4 * 2 and counts[aten.linear] == 3 * 2 + 1
    absmax = qm.graph_module.get_submodule("model.layers.0.self_attn.q_proj").nf4_absmax
    assert absmax.numel() == 64 * 64 // 128
