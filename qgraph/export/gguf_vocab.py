"""The vocabulary a GGUF file carries (tokenizer.ggml.*): the model's own tokenizer, or a byte vocabulary.

llama.cpp builds its tokenizer from the file and sizes its logits by the token list, so every file needs one
token per id of the embedding. A model with a byte-level BPE tokenizer (GPT-2 style, as SmolLM2's) gets it
written as llama.cpp's "gpt2" model: tokens, token types, merges, special ids. A model without a tokenizer
(tiny random models) gets a byte vocabulary in llama.cpp's "llama" (SentencePiece) form: id i < 256 is the
byte token <0xNN>, later ids unused; readers load it, and ids are what the model was trained on either way.
"""

from __future__ import annotations

import json
from typing import Any

import gguf

BYTE_TOKENS = 256
# llama.cpp names the pre-tokenizer (the regex split before BPE) it should use; GPT-2's is the byte-level
# BPE default (llama.cpp identifies others, e.g. SmolLM2's "smollm", by hashing a tokenization it runs)
BYTE_LEVEL_PRE = "gpt-2"
SPECIAL_IDS = ("bos", "eos", "unk", "pad")


def _backend(tokenizer: Any) -> dict | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return None if backend is None else json.loads(backend.to_str())


def _is_byte_level_bpe(spec: dict) -> bool:
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return spec["model"]["type"] == "BPE" and any(step.get("type") == "ByteLevel" for step in steps)


def vocabulary_problem(tokenizer: Any, config: Any) -> str | None:
    """Why `tokenizer` cannot be written for this model (None: it can, or there is none)."""
    if tokenizer is None:
        return None
    spec = _backend(tokenizer)
    if spec is None or not _is_byte_level_bpe(spec):
        kind = "a slow (Python) tokenizer" if spec is None else f"a {spec['model']['type']} tokenizer"
        return (f"the GGUF writer writes byte-level BPE tokenizers (GPT-2 style, as SmolLM2's); this is {kind}: "
                "leave tokenizer= out for a byte vocabulary")
    if len(tokenizer) > config.vocab_size:
        return (f"the tokenizer has {len(tokenizer)} tokens, the model's embedding {config.vocab_size} rows: "
                "pass the tokenizer the model was trained with")
    return None


def write_vocabulary(writer: gguf.GGUFWriter, config: Any, tokenizer: Any) -> str:
    """Write tokenizer.ggml.* for `tokenizer` (or a byte vocabulary when None); returns a note saying which."""
    if tokenizer is None:
        _write_byte_vocabulary(writer, config)
        return ("no tokenizer given: the file carries a byte vocabulary (ids 0-255 as <0xNN>) so readers load it; "
                "pass tokenizer= to write the model's own")
    merges = _write_bpe_vocabulary(writer, config, tokenizer)
    note = f"tokenizer written: {len(tokenizer)} tokens, {merges} merges, pre-tokenizer {BYTE_LEVEL_PRE!r}"
    return note if merges else note + " (llama.cpp needs merges to tokenize text; ids still run)"


def _write_special_ids(writer: gguf.GGUFWriter, ids: dict[str, int | None], vocab_size: int) -> None:
    for kind in SPECIAL_IDS:
        token_id = ids.get(kind)
        if isinstance(token_id, int) and 0 <= token_id < vocab_size:
            getattr(writer, f"add_{kind}_token_id")(token_id)


def _config_special_ids(config: Any) -> dict[str, int | None]:
    return {kind: getattr(config, f"{kind}_token_id", None) for kind in SPECIAL_IDS}


def _write_byte_vocabulary(writer: gguf.GGUFWriter, config: Any) -> None:
    size = config.vocab_size
    special = {i for i in _config_special_ids(config).values() if isinstance(i, int)}
    tokens, types = [], []
    for i in range(size):
        tokens.append(f"<0x{i:02X}>" if i < BYTE_TOKENS else f"<unused{i}>")
        kind = gguf.TokenType.BYTE if i < BYTE_TOKENS else gguf.TokenType.UNUSED
        types.append(gguf.TokenType.CONTROL if i in special else kind)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * size)
    writer.add_token_types(types)
    _write_special_ids(writer, _config_special_ids(config), size)
    writer.add_add_bos_token(False)


def _write_bpe_vocabulary(writer: gguf.GGUFWriter, config: Any, tokenizer: Any) -> int:
    size = config.vocab_size
    tokens = [f"[PAD{i}]" for i in range(size)]  # ids the tokenizer never produces: llama.cpp needs a name
    types = [gguf.TokenType.UNUSED] * size
    added = {i: token.special for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    for token, i in tokenizer.get_vocab().items():
        tokens[i] = token
        if i in added:
            types[i] = gguf.TokenType.CONTROL if added[i] else gguf.TokenType.USER_DEFINED
        else:
            types[i] = gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in _backend(tokenizer)["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(BYTE_LEVEL_PRE)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)  # the gguf writer leaves an empty list out
    ids = {kind: getattr(tokenizer, f"{kind}_token_id", None) for kind in SPECIAL_IDS}
    _write_special_ids(writer, {k: v if v is not None else _config_special_ids(config)[k] for k, v in ids.items()},
                       size)
    return len(merges)
