import math

import pytest
import torch
import torch.nn.functional as F

from qgraph.evaluate import causal_lm_forward, perplexity
from qgraph.models import tiny_causal_lm

VOCAB = 256


def random_blocks(n_blocks, block_len, seed=0):
    return torch.randint(0, VOCAB, (n_blocks, block_len), generator=torch.Generator().manual_seed(seed))


def test_perplexity_of_a_tiny_model_matches_cross_entropy_computed_directly():
    model = tiny_causal_lm("llama")
    blocks = random_blocks(5, 12)
    with torch.no_grad():
        logits = model(input_ids=blocks).logits
    expected = math.exp(F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), blocks[:, 1:].reshape(-1)).item())
    # batch_size 2 leaves a last batch of one block: the mean must still weigh every token alike
    got = perplexity(causal_lm_forward(model), blocks, batch_size=2, progress=False)
    assert got == pytest.approx(expected, rel=1e-5)


def test_perplexity_of_a_perfect_predictor_is_one():
    def knows_the_next_token(input_ids):
        return 100.0 * F.one_hot(input_ids.roll(-1, dims=1), VOCAB).float()

    ppl = perplexity(knows_the_next_token, random_blocks(3, 20), progress=False)
    assert ppl == pytest.approx(1.0, abs=1e-6)


def test_perplexity_of_a_uniform_predictor_is_the_vocabulary_size():
    ppl = perplexity(lambda ids: torch.zeros(*ids.shape, VOCAB), random_blocks(3, 8), progress=False)
    assert ppl == pytest.approx(VOCAB, rel=1e-6)


def test_perplexity_runs_without_autograd_and_with_a_progress_bar():
    def forward(input_ids):
        assert not torch.is_grad_enabled()
        return torch.zeros(*input_ids.shape, VOCAB)

    assert perplexity(forward, random_blocks(2, 4), progress=True, description="held-out") > 1


def test_perplexity_rejects_logits_of_the_wrong_shape():
    with pytest.raises(ValueError, match="logits"):
        perplexity(lambda ids: torch.zeros(ids.shape[0], VOCAB), random_blocks(2, 4), progress=False)


def test_perplexity_given_the_model_itself_points_to_causal_lm_forward():
    model = tiny_causal_lm("llama", vocab=VOCAB)
    with pytest.raises(TypeError, match="got CausalLMOutputWithPast; for a model, pass .*causal_lm_forward"):
        perplexity(model, random_blocks(2, 4), progress=False)
    with pytest.raises(TypeError, match="causal_lm_forward takes a causal LM .* got str"):
        causal_lm_forward("tiny-llama")


@pytest.mark.parametrize(("blocks", "error", "message"), [
    (random_blocks(2, 4) - VOCAB, ValueError, r"token ids in \[-\d+, -\d+\]; the logits score ids >= 0"),
    (random_blocks(2, 4) + VOCAB, ValueError, rf"the logits score {VOCAB} ids \(\[0, {VOCAB - 1}\]\)"),
    (random_blocks(2, 4).float(), TypeError, "integer token ids, got torch.float32"),
])
def test_perplexity_names_token_ids_the_logits_cannot_score(blocks, error, message):
    with pytest.raises(error, match=message):
        perplexity(lambda ids: torch.zeros(*ids.shape, VOCAB), blocks, progress=False)


def test_perplexity_takes_token_ids_of_any_integer_dtype():
    model = tiny_causal_lm("llama", vocab=VOCAB)
    blocks = random_blocks(2, 8)
    want = perplexity(causal_lm_forward(model), blocks, progress=False)
    assert perplexity(causal_lm_forward(model), blocks.int(), progress=False) == pytest.approx(want)


def test_perplexity_rejects_blocks_too_short_to_score():
    with pytest.raises(ValueError, match="block_len >= 2"):
        perplexity(lambda ids: torch.zeros(*ids.shape, VOCAB), random_blocks(2, 1), progress=False)


def test_causal_lm_forward_returns_the_models_logits():
    model = tiny_causal_lm("gpt2")
    ids = random_blocks(2, 6)
    torch.testing.assert_close(causal_lm_forward(model)(ids), model(input_ids=ids).logits)


def test_causal_lm_forward_drives_a_transformed_model():
    import qgraph

    model = tiny_causal_lm("llama", layers=1)
    blocks = random_blocks(3, 10)
    qm = qgraph.transform(model, "lrqat-w4")
    with torch.no_grad():
        expected = perplexity(lambda ids: qm(input_ids=ids).logits, blocks, progress=False)
    assert perplexity(causal_lm_forward(qm), blocks, progress=False) == expected
    with pytest.raises(qgraph.QGraphError, match="keeps no KV cache"):
        qm(input_ids=blocks, use_cache=True)


@pytest.mark.parametrize(("blocks", "batch_size", "error", "message"), [
    (random_blocks(2, 4), 0, ValueError, "batch_size must be a positive integer, got 0"),
    (random_blocks(2, 4), -1, ValueError, "batch_size must be a positive integer, got -1"),
    (random_blocks(2, 4).tolist(), 2, TypeError, "blocks must be a tensor of token ids"),
])
def test_perplexity_names_a_bad_batch_size_or_blocks(blocks, batch_size, error, message):
    with pytest.raises(error, match=message):
        perplexity(lambda ids: torch.zeros(*ids.shape, VOCAB), blocks, batch_size=batch_size, progress=False)
