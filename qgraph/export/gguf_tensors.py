"""What each model family's tensors and hyperparameters are called in a GGUF file, and how they are laid out.

GGUF names tensors the way llama.cpp's converter (convert_hf_to_gguf.py) writes them (`blk.3.attn_q.weight`),
and readers (llama.cpp itself, transformers' GGUF loader) undo the converter's per-family changes: Llama's q/k
rows are permuted from Hugging Face's rotate-half RoPE layout to GGML's interleaved one, Gemma's norms are
stored as 1 + w. A file that skips a change, or applies one its reader does not undo, loads without
complaint and computes garbage; this table is where each family's changes are written down once.

Tensor names come from the gguf package's own map (the one transformers inverts when it reads a file), so
every family it knows is named exactly as its readers expect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gguf
import torch
from torch import Tensor


@dataclass(frozen=True)
class GGUFFamily:
    """How one Hugging Face model type is written as a GGUF architecture."""

    arch: str  # general.architecture: llama.cpp's name for the architecture
    # llama.cpp runs this architecture with GGML's interleaved RoPE (LLAMA_ROPE_TYPE_NORM) while HF rotates
    # halves: the converter permutes q and k rows, and every reader permutes them back
    permute_qk: bool = False
    # added to norm weights on write: Gemma's RMSNorm multiplies by (1 + w), llama.cpp's by the stored weight
    norm_offset: float = 0.0
    # a tied LM head: "omit" the output tensor (readers fall back to token_embd), or "copy" the embedding
    # where llama.cpp requires an output tensor
    tied_output: str = "omit"
    activation: str = "silu"  # the MLP activation llama.cpp hard-codes for the architecture
    # write attention.key_length / value_length (head_dim); families whose head_dim may differ from hidden/heads
    key_length: bool = False
    # the transformers GGUF reader knows this architecture (gemma v1 it does not: llama.cpp reads it)
    transformers_reads: bool = True
    # the head_dim transformers' reader assumes, for architectures whose key_length it does not read
    transformers_head_dim: int | None = None


FAMILIES: dict[str, GGUFFamily] = {
    "llama": GGUFFamily("llama", permute_qk=True),
    # llama.cpp's converter writes Mistral as llama. transformers would read a file named "mistral" as Mistral,
    # but then asks gguf-py for a "mistral" architecture that gguf 0.19 lacks: the name stays unset, and the
    # file reads as Llama, which computes the same within the sliding window
    "mistral": GGUFFamily("llama", permute_qk=True),
    "qwen2": GGUFFamily("qwen2"),
    "qwen3": GGUFFamily("qwen3", key_length=True, transformers_head_dim=128),
    # transformers' reader lacks gemma (v1): the transformers runner registers it (gemma2's keys and processor)
    "gemma": GGUFFamily("gemma", norm_offset=1.0, activation="gelu_pytorch_tanh", key_length=True),
    "phi3": GGUFFamily("phi3", tied_output="copy"),
}

# HF buffers that GGUF does not store: readers recompute them (RoPE frequencies from rope.freq_base, Gemma's
# sqrt(hidden) embedding scale from the architecture)
DERIVED_BUFFERS = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq", "embed_tokens.embed_scale")


def family_of(config: Any) -> GGUFFamily | None:
    return FAMILIES.get(getattr(config, "model_type", ""))


def tensor_name_map(arch: str, block_count: int) -> gguf.TensorNameMap:
    arch_ids = [key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch]
    return gguf.get_tensor_name_map(arch_ids[0], block_count)


def gguf_tensor_name(names: gguf.TensorNameMap, hf_name: str) -> str | None:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`; None when GGUF has no such tensor."""
    return names.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def is_derived_buffer(hf_name: str) -> bool:
    return hf_name.endswith(DERIVED_BUFFERS)


def is_norm(gguf_name: str) -> bool:
    return gguf_name.endswith("_norm.weight")


def ggml_rope_row_order(rows: int, heads: int) -> Tensor:
    """Row indices that turn a q or k projection from HF's rotate-half RoPE layout into GGML's interleaved one.

    Per head, HF rotates element i with element i + d/2; GGML rotates 2i with 2i + 1. llama.cpp's converter
    reshapes the rows to (heads, 2, d/2) and swaps the last two axes: row j of head h becomes row
    2j (first half) or 2j + 1 (second half). Whole rows move, so packed codes and their scales move together.
    """
    half = rows // heads // 2
    return torch.arange(rows).reshape(heads, 2, half).transpose(1, 2).reshape(rows)


def head_dim(config: Any) -> int:
    explicit = getattr(config, "head_dim", None)
    return int(explicit) if explicit else config.hidden_size // config.num_attention_heads


def rope_parameters(config: Any) -> dict:
    """The RoPE settings, however this transformers version spells them (rope_parameters, or rope_theta)."""
    parameters = getattr(config, "rope_parameters", None) or {}
    if "rope_theta" not in parameters and getattr(config, "rope_theta", None) is not None:
        parameters = {**parameters, "rope_theta": config.rope_theta}
    return {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0, **parameters}


def write_hyperparameters(writer: gguf.GGUFWriter, family: GGUFFamily, config: Any) -> None:
    """Every hyperparameter a reader would otherwise guess: a default that differs from the model's would
    load silently and compute something else."""
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(int(head_dim(config) * float(rope["partial_rotary_factor"])))
    if family.key_length:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    if family.arch == "phi3":
        # llama.cpp releases before mid-2025 require phi3's sliding window key (0: none), and read the
        # pre-scaling context length, which without RoPE scaling is the context length
        writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)
        writer.add_rope_scaling_orig_ctx_len(config.max_position_embeddings)
