import copy

import numpy as np
import pytest
import torch
from torch import nn

import qgraph
from passes.attach_side_taps import HEAD_DELTA_MODULE
from qgraph.errors import QGraphError
from qgraph.generate import generate
from qgraph.models import tiny_causal_lm, tiny_sequence_classifier
from qgraph.ops.nf4 import decode_nf4, quantize_nf4
from qgraph.side_network import side_network
from tests.conftest import VOCAB, random_ids, train_steps


@pytest.fixture(scope="module")
def model_and_qst():
    """A tiny Llama and its qst-nf4 module with a side network trained a few steps (so it matters)."""
    model = tiny_causal_lm("llama", layers=2)
    qm = train_steps(qgraph.transform(model, "qst-nf4", r=4), random_ids((4, 24), seed=0), steps=10, lr=3e-2).eval()
    assert abs(side_network(qm).mix.item() - 1) > 0.1  # the head reads (1 - a) of the side network's output
    return model, qm


def nf4_decoded(weight: torch.Tensor) -> torch.Tensor:
    q = quantize_nf4(weight)
    return decode_nf4(q.packed, q.absmax, q.code, q.nested_absmax, q.nested_code, q.offset, *q.shape,
                      q.blocksize, q.nested_blocksize)


def eager_qst(model: nn.Module, side: nn.Module, head_delta: nn.Module) -> nn.Module:
    """The Hugging Face model itself, run eagerly: decoder weights NF4-decoded, the side network fed by
    forward hooks and its output put in place of lm_head's input, the head delta of that input added to
    lm_head's output. Shares nothing with the graph but the side network and the delta."""
    ref = copy.deepcopy(model)
    for name, module in ref.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in name:
            module.weight.data = nf4_decoded(module.weight.data)
    taps: list[torch.Tensor] = []
    mask: dict[str, torch.Tensor] = {}

    def hidden(output):
        return output[0] if isinstance(output, tuple) else output

    ref.model.embed_tokens.register_forward_hook(lambda m, a, out: (taps.clear(), taps.append(out)) and None)
    for layer in ref.model.layers:
        layer.register_forward_hook(lambda m, a, out: taps.append(hidden(out)) and None)
    ref.register_forward_pre_hook(lambda m, a, kw: mask.update(m=kw.get("attention_mask")) and None, with_kwargs=True)
    ref.lm_head.register_forward_pre_hook(lambda m, args: (side(args[0], mask["m"], *taps),))
    ref.lm_head.register_forward_hook(lambda m, args, out: out + head_delta(args[0]))
    ref.generation_config.eos_token_id = None
    return ref


def test_greedy_generation_matches_hugging_face_generate_on_the_eager_model(model_and_qst):
    model, qm = model_and_qst
    prompt = random_ids((2, 6), seed=1)
    ours = qm.generate(prompt, max_new_tokens=10)
    ref = eager_qst(model, side_network(qm), qm.graph_module.get_submodule(HEAD_DELTA_MODULE))
    with torch.no_grad():
        theirs = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                              use_cache=False, pad_token_id=0)
        # the same numbers, not only the same argmax
        torch.testing.assert_close(ref(input_ids=ours, use_cache=False).logits, qm(input_ids=ours).logits,
                                   rtol=1e-4, atol=1e-4)
    assert ours.shape == (2, 16)
    assert torch.equal(ours, theirs)
    # the side network changes what is generated: the backbone alone decodes otherwise
    assert not torch.equal(ours, qgraph.transform(model, "nf4").generate(prompt, max_new_tokens=10))


def test_greedy_is_an_argmax_loop_over_forward(model_and_qst):
    _, qm = model_and_qst
    ids = random_ids((3, 5), seed=2)
    expected = ids
    with torch.no_grad():
        for _ in range(4):
            expected = torch.cat([expected, qm(input_ids=expected).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generate(qm, ids, max_new_tokens=4), expected)


def test_rows_stop_at_eos_and_are_padded(model_and_qst):
    _, qm = model_and_qst
    ids = random_ids((2, 5), seed=3)
    free = qm.generate(ids, max_new_tokens=6)
    eos = int(free[0, 6])  # row 0's second new token: make it the end of sequence
    out = qm.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out[0, :7], free[0, :7]) and (out[0, 7:] == 0).all()
    assert out.shape[1] <= free.shape[1]


def test_sampling_is_reproducible_and_top_k_one_is_greedy(model_and_qst):
    _, qm = model_and_qst
    ids = random_ids((2, 5), seed=4)
    a = qm.generate(ids, max_new_tokens=5, do_sample=True, generator=torch.Generator().manual_seed(0))
    b = qm.generate(ids, max_new_tokens=5, do_sample=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert torch.equal(qm.generate(ids, max_new_tokens=5, do_sample=True, top_k=1), qm.generate(ids, max_new_tokens=5))


def test_mode_is_restored(model_and_qst):
    _, qm = model_and_qst
    qm.train()
    qm.generate(random_ids((1, 4)), max_new_tokens=1)
    assert qm.training and side_network(qm).training
    qm.eval()


def test_errors(model_and_qst):
    _, qm = model_and_qst
    with pytest.raises(QGraphError, match="exceed the 512 positions"):
        qm.generate(random_ids((1, 510)), max_new_tokens=5)
    with pytest.raises(QGraphError, match="temperature must be positive"):
        qm.generate(random_ids((1, 4)), max_new_tokens=1, do_sample=True, temperature=0)
    # greedy reads no temperature: 0 (a common way to say "greedy") is taken, as transformers takes it
    assert torch.equal(qm.generate(random_ids((1, 4)), max_new_tokens=2, temperature=0),
                       qm.generate(random_ids((1, 4)), max_new_tokens=2))
    classifier = qgraph.transform(tiny_sequence_classifier("llama", layers=1), "nf4")
    with pytest.raises(QGraphError, match="generate needs a causal language model; this one is a LlamaForSequence"):
        classifier.generate(random_ids((1, 4)), max_new_tokens=1)


@pytest.fixture(scope="module")
def nf4_llama() -> qgraph.QGraphModule:
    return qgraph.transform(tiny_causal_lm("llama", layers=1), "nf4")


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize(("prompt", "mask", "error", "message"), [
    # an empty prompt reached bitsandbytes' CPU kernel through the decode graph, which died of a division by zero
    (torch.zeros(2, 0, dtype=torch.long), None, QGraphError, r"shape \(2, 0\) is outside the captured range"),
    (random_ids((2, 4)).float(), None, TypeError, r"input_ids must hold torch\.int64 token ids"),
    (random_ids((2, 4)).tolist(), None, TypeError, "input_ids must be a tensor of token ids, got list"),
    (random_ids((65, 4)), None, QGraphError, r"shape \(65, 4\) is outside the captured range \(batch 1\.\.64"),
    (torch.full((1, 4), 999), None, QGraphError, r"token id 999 at \(batch 0, position 0\)"),
    (random_ids((2, 4)), torch.ones(2, 3, dtype=torch.long), QGraphError,
     r"attention_mask has shape \(2, 3\) but input_ids has \(2, 4\)"),
    (random_ids((2, 4)), torch.ones(2, 4), TypeError, "attention_mask must hold integers"),
], ids=["empty", "float", "list", "batch65", "out-of-vocab", "mask-shape", "float-mask"])
def test_generate_checks_its_prompt_as_forward_does(nf4_llama, use_cache, prompt, mask, error, message):
    with pytest.raises(error, match=message):
        nf4_llama.generate(prompt, attention_mask=mask, max_new_tokens=2, use_cache=use_cache)


def test_eos_may_be_a_list_and_pad_must_be_in_the_vocabulary(nf4_llama):
    ids = random_ids((2, 5), seed=3)
    free = nf4_llama.generate(ids, max_new_tokens=6)
    eos = int(free[0, 6])
    single = nf4_llama.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    # a list, as Hugging Face generation configs hold: any of its ids ends a row (here the second, as the
    # first never comes)
    unseen = next(token for token in range(VOCAB) if not (free == token).any())
    listed = nf4_llama.generate(ids, max_new_tokens=6, eos_token_id=[unseen, eos], pad_token_id=0)
    assert torch.equal(listed, single) and (listed[0, 7:] == 0).all()
    with pytest.raises(QGraphError, match=r"pad_token_id=-1 is outside the model's vocabulary \(0\.\.255\)"):
        nf4_llama.generate(ids, max_new_tokens=2, eos_token_id=eos, pad_token_id=-1)
    with pytest.raises(TypeError, match=r"pad_token_id must be an integer token id, got \[0, 1\]"):
        nf4_llama.generate(ids, max_new_tokens=2, eos_token_id=eos, pad_token_id=[0, 1])
    with pytest.raises(TypeError, match=r"eos_token_id must be an integer token id or a list of them, got \['2'\]"):
        nf4_llama.generate(ids, max_new_tokens=2, eos_token_id=["2"])


@pytest.mark.parametrize(("option", "message"), [
    ({"max_new_tokens": True}, "max_new_tokens must be a non-negative integer, got True"),
    ({"max_new_tokens": 2, "do_sample": True, "temperature": "1"}, "temperature must be a positive number, got '1'"),
    ({"max_new_tokens": 2, "do_sample": True, "top_k": True}, "top_k must be a positive integer or None, got True"),
    ({"max_new_tokens": 2, "eos_token_id": 2.0}, "eos_token_id must be an integer token id or a list of them"),
])
def test_generate_refuses_options_of_the_wrong_type(nf4_llama, option, message):
    with pytest.raises(TypeError, match=message):
        nf4_llama.generate(random_ids((1, 4)), **option)


def test_numpy_and_tensor_scalars_are_numbers_and_a_pad_without_eos_is_never_used(nf4_llama):
    ids = random_ids((2, 5), seed=3)
    free = nf4_llama.generate(ids, max_new_tokens=6)
    eos = int(free[0, 6])
    # the pad defaults to the (first) eos id
    expected = nf4_llama.generate(ids, max_new_tokens=6, eos_token_id=eos)
    assert (expected[0, 7:] == eos).all()
    for eos_as in (np.int64(eos), torch.tensor(eos), torch.tensor([eos, VOCAB - 1]), [eos]):
        assert torch.equal(nf4_llama.generate(ids, max_new_tokens=6, eos_token_id=eos_as), expected)
    # LLaMA-1 configs ship pad_token_id=-1 with no eos in the loop: no row is padded, so it is not refused
    assert torch.equal(nf4_llama.generate(ids, max_new_tokens=6, pad_token_id=-1), free)
    sampled = [nf4_llama.generate(ids, max_new_tokens=3, do_sample=True, temperature=t,
                                  generator=torch.Generator().manual_seed(0)) for t in (0.7, np.float32(0.7),
                                                                                        torch.tensor(0.7))]
    assert all(torch.equal(s, sampled[0]) for s in sampled)


@pytest.mark.parametrize("plan", ["qst-nf4", "lrqat-w4", "nf4"])  # the head outside the graph, and inside it
def test_next_token_logits_are_forwards_last_position(plan):
    qm = qgraph.transform(tiny_causal_lm("llama", layers=1), plan).eval()
    ids, mask = random_ids((2, 7), seed=5), torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0  # left padding, as a batch of prompts has
    with torch.no_grad():
        expected = qm(input_ids=ids, attention_mask=mask).logits[:, -1]
        got = qm.next_token_logits(ids, mask)
    assert got.shape == (2, qm.info.config.vocab_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_an_out_of_graph_head_reads_the_last_position_only(monkeypatch):
    qm = qgraph.transform(tiny_causal_lm("llama", layers=1), "lrqat-w4").eval()
    head_weight, _ = qm._head_parameters()
    linear, head_inputs = torch.nn.functional.linear, []

    def spy(x, weight, bias=None):
        if weight is head_weight:
            head_inputs.append(tuple(x.shape))
        return linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    with torch.no_grad():
        qm.next_token_logits(random_ids((2, 9), seed=6))
    assert head_inputs == [(2, qm.info.config.hidden_size)]


def test_next_token_logits_needs_a_causal_lm():
    classifier = qgraph.transform(tiny_sequence_classifier("llama", layers=1), "nf4")
    with pytest.raises(QGraphError, match="need a causal language model; this one is a LlamaForSequence"):
        classifier.next_token_logits(random_ids((1, 4)))


def test_a_prompt_row_ending_in_padding_warns_as_transformers_does(nf4_llama):
    import warnings

    ids = torch.randint(3, 200, (2, 6), generator=torch.Generator().manual_seed(0))
    right = torch.ones_like(ids)
    right[1, 4:] = 0
    with pytest.warns(UserWarning, match=r"a prompt row ends in padding.*padding_side = 'left'"):
        generate(nf4_llama, ids, max_new_tokens=1, attention_mask=right)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(nf4_llama, ids, max_new_tokens=1, attention_mask=right.flip(1))  # left padding: no warning


def test_longrope_models_generate_uncached_and_the_report_says_why(tmp_path):
    head_dim = 16
    model = tiny_causal_lm("phi3", layers=1, original_max_position_embeddings=32, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * (head_dim // 2),
        "long_factor": [4.0] * (head_dim // 2)})
    qm = qgraph.transform(model, "nf4")
    # its frequencies switch in place past 32 tokens: a decode graph captured from a stand-in failed with a raw
    # "more than one element of the written-to tensor refers to a single memory location"
    assert qm.report.decoding.startswith("no KV cache (longrope rotary embeddings rewrite their frequencies")
    ids = random_ids((2, 30), seed=1)
    tokens = qm.generate(ids, max_new_tokens=4)  # across the 32-token switch
    with torch.no_grad():
        for _ in range(4):
            ids = torch.cat([ids, qm(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(tokens, ids)
    with pytest.raises(qgraph.ExportError, match=r"which this model cannot have: longrope rotary embeddings"):
        qgraph.export(qgraph.finalize(qm), tmp_path / "m.pt2", decode=True)
