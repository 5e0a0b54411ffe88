"""The KV-cached decode graph (qgraph.decode): the same tokens and logits as the uncached path, from
tensors shared with the training graph."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import qgraph
from qgraph.decode import EXAMPLE_BATCH, EXAMPLE_NEW, EXAMPLE_PAST, DecodeSession, signature_args, thread_side_cache
from qgraph.errors import QGraphError
from qgraph.generate import RecomputeSession
from qgraph.models import tiny_causal_lm, tiny_sequence_classifier
from qgraph.ops.fused_inference import fused_inference
from qgraph.side_network import side_network
from tests.conftest import random_ids, train_steps
from tests.passes.test_quantize_nf4 import with_bnb_linear4bit
from tests.test_generate import nf4_decoded

FAMILIES = ["llama", "gpt2", "qwen2", "mistral", "gemma", "phi3", "qwen3"]


def left_padded(batch: int, length: int, pads: list[int], seed: int = 0, *,
                right: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts whose rows start (or, right=True, end) with pads[row] padding tokens."""
    ids = random_ids((batch, length), seed=seed)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        padding = slice(length - pad, length) if right else slice(0, pad)
        mask[row, padding] = 0
        ids[row, padding] = 0
    return ids, mask


def uncached(qm: nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return qm.generate(ids, use_cache=False, **kwargs)


def step_logits(session, ids: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        logits = [session.start(ids, mask)]
        logits += [session.step(token) for token in tokens.T]
    return logits


def assert_same_steps(qm: nn.Module, ids: torch.Tensor, mask: torch.Tensor, steps: int = 6, *,
                      atol: float = 1e-4, atol_of_magnitude: float = 0.0) -> None:
    """Every step's next-token logits, cached against recomputed, on the same forced tokens: within `atol` plus
    `atol_of_magnitude` times the recomputed logits' largest magnitude, and the same greedy token."""
    tokens = random_ids((ids.shape[0], steps), seed=9)
    cached = step_logits(qm.decode_session(), ids, mask, tokens)
    recomputed = step_logits(RecomputeSession(qm), ids, mask, tokens)
    for step, (got, expected) in enumerate(zip(cached, recomputed)):
        tolerance = atol + atol_of_magnitude * expected.abs().max().item()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=tolerance, msg=f"step {step}")
        assert torch.equal(got.argmax(-1), expected.argmax(-1)), f"step {step}"


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_steps_equal_recomputed_steps_in_every_family(family):
    qm = qgraph.transform(tiny_causal_lm(family, layers=2), "nf4").eval()
    ids, mask = left_padded(3, 7, [0, 2, 5])
    assert_same_steps(qm, ids, mask)
    assert torch.equal(qm.generate(ids, attention_mask=mask, max_new_tokens=8),
                       uncached(qm, ids, attention_mask=mask, max_new_tokens=8))


@pytest.fixture(scope="module")
def trained():
    """lrqat-w4 and qst-nf4 on a tiny Llama, a few steps trained so A, B, the scales and the side network
    all matter."""
    modules = {}
    for plan, options in [("lrqat-w4", {}), ("qst-nf4", {"r": 4}), ("lrqat-w4a8", {"group_size": 32})]:
        qm = qgraph.transform(tiny_causal_lm("llama", layers=2), plan, **options)
        modules[plan] = train_steps(qm, random_ids((4, 24), seed=0), steps=5, lr=3e-2).eval()
    return modules


@pytest.mark.parametrize("plan", ["lrqat-w4", "qst-nf4", "lrqat-w4a8"])
def test_trained_modules_decode_with_the_cache_as_without(trained, plan):
    qm = trained[plan]
    ids, mask = left_padded(2, 9, [0, 3], seed=1)
    # int8 per-token activations round: the cached and recomputed paths sum in different orders (attention over
    # another number of keys), and a one-ulp difference before the rounding moves a code by one step. That
    # happens or not by CPU (on an AVX2 EPYC: 0.006 in a logit range of 0.5, the left-padded row, three steps;
    # none on an AVX512 Xeon), as it does in the runtime. So w4a8 logits agree to 2% of their largest magnitude.
    assert_same_steps(qm, ids, mask, atol_of_magnitude=2e-2 if plan == "lrqat-w4a8" else 0.0)
    assert torch.equal(qm.generate(ids, attention_mask=mask, max_new_tokens=10),
                       uncached(qm, ids, attention_mask=mask, max_new_tokens=10))


def test_the_side_network_is_in_the_cached_loop(trained):
    qm = trained["qst-nf4"]
    assert abs(side_network(qm).mix.item() - 1) > 0.05  # the head reads (1 - a) of the side network's output
    assert qm.decode_graph.graph_module.qst_side is side_network(qm)
    prompt = random_ids((2, 6), seed=2)
    backbone = qgraph.transform(tiny_causal_lm("llama", layers=2), "nf4")
    assert not torch.equal(qm.generate(prompt, max_new_tokens=10), backbone.generate(prompt, max_new_tokens=10))


def test_a_graph_without_a_side_network_keeps_its_signature():
    decode = qgraph.transform(tiny_causal_lm("llama", layers=1), "nf4").decode_graph
    before, examples = str(decode.graph_module.graph), dict(decode.example_inputs)
    assert thread_side_cache(decode.graph_module, examples) is None
    assert str(decode.graph_module.graph) == before and examples == decode.example_inputs
    assert decode.side_cache is None and decode.past_count == 2


def test_the_side_networks_keys_and_values_are_the_decode_graphs_inputs_and_outputs():
    qm = qgraph.transform(tiny_causal_lm("llama", layers=2), "qst-nf4")
    decode, config = qm.decode_graph, side_network(qm).config
    names = [node.target for node in decode.graph_module.graph.find_nodes(op="placeholder")]
    assert names[4:] == [f"past_{i}" for i in range(4 + 2 * config.blocks)]  # the model's 2 layers', then the side's
    with torch.no_grad():
        logits, *present = decode.graph_module(*signature_args(decode.example_inputs))
    assert len(present) == decode.past_count and logits.shape[:2] == (EXAMPLE_BATCH, EXAMPLE_NEW)
    assert present[4].shape == (EXAMPLE_BATCH, config.heads, EXAMPLE_PAST + EXAMPLE_NEW, config.head_dim)
    with pytest.raises(QGraphError, match="already reads its cache"):
        thread_side_cache(decode.graph_module, dict(decode.example_inputs))


def storages(module: nn.Module) -> dict[int, int]:
    """Every non-empty storage a module's parameters and buffers use, by address."""
    tensors = [*module.parameters(), *module.buffers()]
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.numel()}


@pytest.mark.parametrize("plan", ["nf4", "lrqat-w4", "qst-nf4"])
def test_the_decode_graph_holds_no_tensor_of_its_own(plan):
    qm = qgraph.transform(tiny_causal_lm("llama", layers=2), plan)
    train, decode = storages(qm.graph_module), storages(qm.decode_graph.graph_module)
    assert set(decode) <= set(train)
    trainable = {id(p) for p in qm.trainable_parameters()}
    assert trainable <= {id(p) for p in qm.decode_graph.graph_module.parameters()}
    assert len(qm.state_dict()) == len(qm.graph_module.state_dict())  # not registered twice


def test_training_moves_what_decoding_reads():
    qm = qgraph.transform(tiny_causal_lm("llama", layers=2), "lrqat-w4")
    prompt = random_ids((1, 6), seed=3)
    before = qm.decode_session().start(prompt, torch.ones_like(prompt))
    train_steps(qm, random_ids((4, 16), seed=4), steps=3, lr=5e-2)
    with torch.no_grad():
        after = qm.decode_session().start(prompt, torch.ones_like(prompt))
        expected = qm.eval().next_token_logits(prompt)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)


def test_nf4_greedy_equals_transformers_cached_generate_on_the_decoded_weights():
    model = tiny_causal_lm("llama", layers=2)
    qm = qgraph.transform(model, "nf4")
    ref = copy.deepcopy(model)
    for name, module in ref.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in name:
            module.weight.data = nf4_decoded(module.weight.data)
    ref.generation_config.eos_token_id = None
    prompt = random_ids((2, 8), seed=5)
    with torch.no_grad():
        theirs = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                              use_cache=True, pad_token_id=0)
    # fused_kernels=False: every weight decoded to float32, as the reference's are
    assert torch.equal(qm.generate(prompt, max_new_tokens=12, fused_kernels=False), theirs)


def test_nf4_greedy_equals_transformers_with_bitsandbytes_linear4bit():
    # the peer the speed table compares with: transformers' generate over bitsandbytes' own NF4 layers,
    # which run its fused CPU kernel in eval mode (where the CPU has AVX512-BF16), as qm.generate does
    model = tiny_causal_lm("llama", layers=2)
    qm = qgraph.transform(model, "nf4")
    ref = with_bnb_linear4bit(model, "model.layers.")
    ref.generation_config.eos_token_id = None
    prompt = random_ids((1, 8), seed=5)
    mask = torch.ones_like(prompt)
    with torch.no_grad():
        theirs = ref.eval().generate(prompt, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                     use_cache=True, pad_token_id=0)
        their_logits = ref(prompt, attention_mask=mask).logits[:, -1]
        with fused_inference():
            our_logits = qm.decode_session().start(prompt, mask)
    assert torch.equal(qm.generate(prompt, max_new_tokens=12), theirs)
    assert torch.equal(our_logits, their_logits)  # the same kernel on the same bytes, not merely close


def test_a_finalized_module_decodes_its_folded_weights_with_the_cache(trained):
    fin = qgraph.finalize(trained["lrqat-w4"])
    counts = {str(n.target) for n in fin.decode_graph.graph_module.graph.nodes if n.op == "call_function"}
    assert "qgraph.int4_linear.default" in counts and "qgraph.lrqat_linear.default" not in counts
    assert set(storages(fin.decode_graph.graph_module)) <= set(storages(fin.graph_module))
    ids, mask = left_padded(2, 7, [1, 0], seed=6)
    assert_same_steps(fin, ids, mask)
    prompt = random_ids((2, 6), seed=7)
    assert torch.equal(fin.generate(prompt, max_new_tokens=8), trained["lrqat-w4"].generate(prompt, max_new_tokens=8))


def test_sampling_draws_the_same_tokens_with_the_cache(trained):
    qm = trained["qst-nf4"]
    prompt = random_ids((2, 5), seed=8)
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=0.8, top_k=20)
    cached = qm.generate(prompt, generator=torch.Generator().manual_seed(1), **kwargs)
    assert torch.equal(cached, uncached(qm, prompt, generator=torch.Generator().manual_seed(1), **kwargs))


def test_the_decode_graph_is_built_at_first_use_and_the_report_says_so():
    model = tiny_causal_lm("llama", layers=1)
    qm = qgraph.transform(model, "nf4")
    assert qm.kv_cache and qm._decode_graph is None and "captured at the first generate" in qm.report.decoding
    assert isinstance(qm.decode_session(), DecodeSession)
    assert "built at first use" in qm.report.decoding
    without = qgraph.transform(tiny_causal_lm("llama", layers=1), "nf4", kv_cache=False)
    assert without.decode_graph is None and "no KV cache (kv_cache=False)" in without.report.decoding
    classifier = qgraph.transform(tiny_sequence_classifier("llama", layers=1), "nf4")
    assert classifier.decode_graph is None and classifier.report.decoding == ""


@pytest.mark.parametrize("plan", ["lrqat-w4", "qst-nf4"])
def test_the_recipe_holds_no_tensor_data(plan):
    model = tiny_causal_lm("llama", layers=2)
    recipe = qgraph.transform(model, plan).decode_recipe
    tensors = [*recipe.model.parameters(), *recipe.model.buffers()]
    tensors += [t for value in recipe.made.values() for t in torch.utils._pytree.tree_leaves(value)
                if isinstance(t, torch.Tensor)]
    assert tensors and all(t.untyped_storage().nbytes() <= t.element_size() for t in tensors)
    assert model.model.layers[0].self_attn.q_proj.weight.stride() != (0, 0)  # the user's model is untouched


def test_a_finalized_module_outlives_its_source_and_still_decodes_cached():
    qm = qgraph.transform(tiny_causal_lm("llama", layers=2), "lrqat-w4")
    prompt = random_ids((2, 5), seed=10)
    expected = qm.generate(prompt, max_new_tokens=6, use_cache=False)
    fin = qgraph.finalize(qm)
    del qm
    assert torch.equal(fin.generate(prompt, max_new_tokens=6), expected)


def test_gpt2_is_a_causal_lm_that_generates():
    qm = qgraph.transform(tiny_causal_lm("gpt2", layers=1), "nf4")
    assert qm.info.is_causal_lm
    assert qm.generate(random_ids((1, 4)), max_new_tokens=3).shape == (1, 7)


def test_a_step_before_the_prompt_is_an_error():
    qm = qgraph.transform(tiny_causal_lm("llama", layers=1), "nf4")
    with pytest.raises(QGraphError, match="step before start"):
        qm.decode_session().step(torch.tensor([3]))


@pytest.fixture(scope="module")
def qst_module(trained):
    return trained["qst-nf4"]


@settings(max_examples=12, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(batch=st.integers(1, 3), length=st.integers(1, 12), right=st.booleans(), data=st.data())
def test_padding_and_prompt_length_never_change_the_tokens(qst_module, batch, length, right, data):
    pads = [data.draw(st.integers(0, length - 1), label=f"pad {row}") for row in range(batch)]
    ids, mask = left_padded(batch, length, pads, seed=length, right=right)
    assert_same_steps(qst_module, ids, mask, steps=3)
