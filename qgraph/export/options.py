"""Target options a caller that holds more than the module (a tokenizer) passes to the targets that take them."""

from __future__ import annotations

from typing import Any

# targets whose files carry the model's tokenizer (GGUF: tokenizer.ggml.*, what llama.cpp tokenizes with)
TOKENIZER_TARGETS = ("gguf",)


def target_tokenizer(target: str, tokenizer: Any) -> dict[str, Any]:
    """{"tokenizer": tokenizer} for a target that writes one into its file, else nothing."""
    return {"tokenizer": tokenizer} if target in TOKENIZER_TARGETS and tokenizer is not None else {}
