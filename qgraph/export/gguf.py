"""The gguf target: a finalized int4 model as a GGUF file that llama.cpp (and transformers) run.

qgraph::int4_linear becomes GGUF `Q4_0`: per block of 32 weights of a row, an fp16 scale d and 32 codes
q in 0..15, w = d * (q - 8). A qgraph code c (signed, in [-8, 7]) is q = c + 8, and every block lies inside
one of qgraph's groups when the group size is a multiple of 32 (per-channel: the row length), so the blocks
are packed here from qgraph's own codes and scales — `gguf.quants.quantize` would re-derive scales from
dequantized floats and change the weights. The only rounding is the scale's, fp32 -> fp16: reported.

Norms and biases are F32; the embedding and a float LM head F32, F16 or Q8_0 (`embeddings=`). Q/K rows of
llama-architecture models are permuted as llama.cpp's converter does (qgraph.export.gguf_tensors), whole
rows of codes and scales, so the blocks stay exact. NF4 has no GGUF type.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

import gguf
import numpy as np
import torch
from torch import Tensor, fx

from qgraph.export.gguf_tensors import (
    FAMILIES,
    GGUFFamily,
    family_of,
    ggml_rope_row_order,
    gguf_tensor_name,
    head_dim,
    is_derived_buffer,
    is_norm,
    rope_parameters,
    tensor_name_map,
    write_hyperparameters,
)
from qgraph.export.gguf_vocab import vocabulary_problem, write_vocabulary
from qgraph.export.target import Artifact, ExportTarget
from qgraph.graph import get_attr_tensor
from qgraph.module import QGraphModule
from qgraph.ops.round_scale import rounding_deviation
from qgraph.quant.downcast import PACKED_MAX_BITS, unpack_codes

INT4_LINEAR = torch.ops.qgraph.int4_linear.default
NF4_LINEAR = torch.ops.qgraph.nf4_linear.default
Q4_0_BLOCK = 32  # weights per Q4_0 (and Q8_0) block: one fp16 scale each
Q4_0_OFFSET = 8  # Q4_0 stores q = c + 8 in 0..15 for a signed code c
FP16_MAX = float(torch.finfo(torch.float16).max)
# fp16 keeps 10 fraction bits: rounding a (normal) fp32 scale changes it by at most 2^-11 of itself
FP16_ROUNDING = 2.0**-11
# with fp16-exact scales transformers' logits equal the module's (measured bitwise on tiny llama and qwen2);
# room for float32 reassociation on other BLAS builds
FLOAT_NOISE = 1e-4
# llama.cpp rounds activations to 8 bits (Q8_0 blocks) before its 4-bit matmuls, and the error grows with depth.
# Measured on the check batches (random tokens), as a fraction of the logits' range per decoder layer: 0.22% on
# a 2-layer tiny llama, 0.26% on SmolLM2-135M exported here, 0.45% for the SmolLM2 Q4_1 file that llama.cpp's
# own converter made (llama.cpp against transformers reading that same file). A bound above all three:
LLAMA_CPP_RELATIVE_TOLERANCE_PER_LAYER = 0.005
EMBEDDING_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                   "q8_0": gguf.GGMLQuantizationType.Q8_0}
RUNTIMES = ("transformers", "llama.cpp")
RUNNERS = {"transformers": "gguf_transformers.py", "llama.cpp": "gguf_llama_cpp.py"}
LLAMA_CPP_INSTALL = "install llama-cpp-python with tools/install_llama_cpp.sh (compiles llama.cpp, ~9 min on 2 cores)"
NF4_REFUSAL = ("NF4 has no GGUF type (GGUF's 4-bit types are uniform grids); use an int4 plan such as "
               "lrqat-w4, or export nf4 to .onnx / .pt2")


@dataclass(frozen=True)
class GGUFOptions:
    """embeddings: the type of the token embedding and a float LM head ("f32", "f16", "q8_0").
    runtime: the reader the export check runs the file in ("transformers", or "llama.cpp" when
    llama-cpp-python is installed). tokenizer: the model's Hugging Face tokenizer, written as tokenizer.ggml.*
    (byte-level BPE tokenizers); without one the file gets a byte vocabulary readers accept."""

    embeddings: str = "f32"
    runtime: str = "transformers"
    tokenizer: Any = None

    def __post_init__(self) -> None:
        if self.embeddings not in EMBEDDING_TYPES:
            raise ValueError(f"embeddings must be one of {', '.join(EMBEDDING_TYPES)}, got {self.embeddings!r}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")


# --- reading the finalized graph ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Int4Weight:
    """One int4_linear's weight: where it sits in the HF model, and its codes and scales as stored."""

    hf_name: str  # the linear's module path, e.g. model.layers.0.self_attn.q_proj
    packed: Tensor
    scale: Tensor  # fp32 (out, groups); one group per row when per-channel
    bits: int
    in_features: int

    @property
    def group_size(self) -> int:
        """The effective group: the row length per scale (the row itself when per-channel)."""
        return self.in_features // self.scale.shape[1]

    def codes(self) -> Tensor:
        return unpack_codes(self.packed, self.bits, self.in_features)


def int4_weights(module: QGraphModule) -> list[Int4Weight]:
    gm = module.graph_module
    weights = []
    for node in _call_nodes(gm.graph, INT4_LINEAR):
        _, codes, scale, _, bits, _, in_features = node.args
        weights.append(Int4Weight(codes.target.rpartition(".")[0], get_attr_tensor(gm, codes.target),
                                  get_attr_tensor(gm, scale.target), int(bits), int(in_features)))
    return weights


def _call_nodes(graph: fx.Graph, target: Any) -> list[fx.Node]:
    return [node for node in graph.nodes if node.op == "call_function" and node.target == target]


def float_tensors(module: QGraphModule) -> dict[str, Tensor]:
    """Every floating tensor the model keeps by its HF name (a tied head under both names), except the
    int4 weights' codes and scales and the buffers readers recompute."""
    gm = module.graph_module
    quantized = {n.target for node in _call_nodes(gm.graph, INT4_LINEAR) for n in node.args[1:3]}
    named = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
    return {name: tensor.detach() for name, tensor in named
            if name not in quantized and not is_derived_buffer(name) and tensor.is_floating_point()}


def is_tied(module: QGraphModule, tensors: dict[str, Tensor]) -> bool:
    """Whether the LM head is the embedding itself (the same tensor; no head of its own, float or int4)."""
    head, embedding = tensors.get("lm_head.weight"), tensors.get("model.embed_tokens.weight")
    if head is None:
        return not any(weight.hf_name == "lm_head" for weight in int4_weights(module))
    return embedding is not None and head.data_ptr() == embedding.data_ptr()


# --- what GGUF cannot express ---------------------------------------------------------------------------------


def unsupported(module: QGraphModule, options: GGUFOptions) -> str | None:
    config = module.info.config
    gm = module.graph_module
    if _call_nodes(gm.graph, NF4_LINEAR):
        return NF4_REFUSAL
    family = family_of(config)
    if family is None:
        return (f"GGUF tensor maps cover {', '.join(FAMILIES)}; a {getattr(config, 'model_type', '?')} model has "
                "none here: export it to .onnx or .pt2")
    # a called submodule with weights of its own (QST's side network), not torch.export's guard function
    side_modules = [node.target for node in gm.graph.nodes if node.op == "call_module"
                    and any(True for _ in gm.get_submodule(node.target).parameters())]
    if side_modules:
        return (f"GGUF holds only the architecture's own layers; this graph also calls {side_modules[0]!r} "
                "(a side network): export it to .onnx or .pt2")
    for weight in int4_weights(module):
        problem = _int4_problem(weight)
        if problem:
            return problem
    return (_architecture_problem(family, config) or _tensor_problem(module, family)
            or _options_problem(family, config, options))


def _int4_problem(weight: Int4Weight) -> str | None:
    if weight.bits > PACKED_MAX_BITS:
        return (f"{weight.hf_name} has {weight.bits}-bit codes; GGUF Q4_0 holds codes of at most 4 bits: use a "
                "4-bit (or 3-bit) plan such as lrqat-w4, or export to .onnx / .pt2")
    if weight.group_size % Q4_0_BLOCK:
        what = ("per-channel scales over rows of" if weight.scale.shape[1] == 1
                else "groups of")
        return (f"{weight.hf_name} has {what} {weight.group_size} weights; GGUF Q4_0 blocks hold 32 weights under "
                f"one scale, so groups must be a multiple of 32: transform with group_size=32, 64 or 128 "
                "(per-channel needs in_features divisible by 32), or export to .onnx / .pt2")
    largest = float(weight.scale.abs().max()) if weight.scale.numel() else 0.0
    if not np.isfinite(largest) or largest > FP16_MAX:
        return (f"{weight.hf_name} has a scale of {largest:g}, beyond fp16's range (GGUF Q4_0 stores fp16 "
                "scales): export to .onnx / .pt2")
    return None


def _architecture_problem(family: GGUFFamily, config: Any) -> str | None:
    model_type = config.model_type
    activation = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if activation != family.activation:
        return (f"llama.cpp runs {model_type} models with {family.activation}; this one uses {activation}: "
                "export it to .onnx or .pt2")
    rope = rope_parameters(config)
    if rope["rope_type"] != "default":
        return (f"the model uses {rope['rope_type']!r} RoPE scaling, which this GGUF writer does not express "
                "yet: export it to .onnx or .pt2")
    if head_dim(config) % 2:
        return f"RoPE rotates pairs of a head's dimensions; this model's heads have {head_dim(config)}"
    return None


def _tensor_problem(module: QGraphModule, family: GGUFFamily) -> str | None:
    names = tensor_name_map(family.arch, module.info.config.num_hidden_layers)
    tensors = float_tensors(module)
    if is_tied(module, tensors):
        tensors.pop("lm_head.weight", None)
    hf_names = [f"{w.hf_name}.weight" for w in int4_weights(module)] + list(tensors)
    for hf_name in hf_names:
        if gguf_tensor_name(names, hf_name) is None:
            return (f"the tensor {hf_name} has no name in GGUF's {family.arch} layout (llama.cpp would not read "
                    "it): export this model to .onnx or .pt2")
    return None


def _options_problem(family: GGUFFamily, config: Any, options: GGUFOptions) -> str | None:
    if options.embeddings == "q8_0" and config.hidden_size % Q4_0_BLOCK:
        return (f"embeddings='q8_0' needs a hidden size divisible by 32, this model's is {config.hidden_size}: "
                "use embeddings='f16' or 'f32'")
    if options.runtime == "transformers" and not family.transformers_reads:
        return (f"transformers' GGUF reader does not read the {family.arch} architecture, so the file cannot be "
                f"checked with it: pass runtime='llama.cpp' ({LLAMA_CPP_INSTALL})")
    assumed = family.transformers_head_dim
    if options.runtime == "transformers" and assumed and head_dim(config) != assumed:
        return (f"transformers' GGUF reader assumes {family.arch} heads of {assumed} (it does not read "
                f"attention.key_length); this model's are {head_dim(config)}, so it would misread the file: "
                f"pass runtime='llama.cpp' ({LLAMA_CPP_INSTALL})")
    if options.runtime == "llama.cpp" and importlib.util.find_spec("llama_cpp") is None:
        return f"runtime='llama.cpp' needs llama-cpp-python, which is not installed: {LLAMA_CPP_INSTALL}"
    return vocabulary_problem(options.tokenizer, config)


# --- Q4_0 --------------------------------------------------------------------------------------------------------


def block_scales(scale: Tensor, in_features: int) -> Tensor:
    """(out, in / 32): the scale each 32-weight block is under (its group's, or its row's)."""
    group_size = in_features // scale.shape[1]
    return scale.repeat_interleave(group_size // Q4_0_BLOCK, dim=1)


def q4_0_blocks(codes: Tensor, scale: Tensor) -> np.ndarray:
    """GGUF Q4_0 bytes, (out, in / 32 * 18), for signed codes (int8 (out, in), in [-8, 7]) and their fp32
    scales ((out, groups), groups of a multiple of 32 weights).

    Each block is ggml's block_q4_0: the fp16 scale d, then 16 bytes whose low nibbles hold q of the block's
    weights 0..15 and high nibbles weights 16..31, q = c + 8. Dequantized: d * (q - 8) = fp16(s) * c.
    """
    rows, in_features = codes.shape
    n_blocks = in_features // Q4_0_BLOCK
    d = block_scales(scale, in_features).to(torch.float16).contiguous().view(torch.uint8).reshape(rows, n_blocks, 2)
    q = (codes.to(torch.int16) + Q4_0_OFFSET).to(torch.uint8).reshape(rows, n_blocks, Q4_0_BLOCK)
    half = Q4_0_BLOCK // 2
    nibbles = q[..., :half] | (q[..., half:] << 4)
    return torch.cat([d, nibbles], dim=-1).reshape(rows, n_blocks * (2 + half)).numpy()


# --- the file ---------------------------------------------------------------------------------------------------


@dataclass
class _Contents:
    """The tensors in GGUF order (name, data, GGUF type when data is raw bytes), and what went where."""

    tensors: list[tuple[str, np.ndarray, gguf.GGMLQuantizationType | None]] = field(default_factory=list)
    op_mapping: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    scale_deviation: float = 0.0  # the largest relative change fp16 made to a trained scale
    # the largest change F16 / Q8_0 made to the embedding or a float head, relative to its largest weight
    embedding_deviation: float = 0.0


def write(job: Any) -> Artifact:
    """Write the finalized module `job.module` as a GGUF file at `job.path` (see ExportJob)."""
    module, options = job.module, job.options
    config = module.info.config
    family = family_of(config)
    contents = gguf_contents(module, options)
    writer = gguf.GGUFWriter(str(job.path), family.arch)
    write_hyperparameters(writer, family, config)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    contents.notes.append(write_vocabulary(writer, config, options.tokenizer))
    for name, data, raw_type in contents.tensors:
        writer.add_tensor(name, data, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tolerance, relative = check_tolerances(max(contents.scale_deviation, contents.embedding_deviation),
                                           config.num_hidden_layers, options.runtime)
    return Artifact(op_mapping=contents.op_mapping, notes=contents.notes, runner=RUNNERS[options.runtime],
                    tolerance=tolerance, relative_tolerance=relative)


def gguf_contents(module: QGraphModule, options: GGUFOptions) -> _Contents:
    config = module.info.config
    family = family_of(config)
    names = tensor_name_map(family.arch, config.num_hidden_layers)
    contents = _Contents()
    weights = int4_weights(module)
    deviation = 0.0
    for weight in weights:
        name = gguf_tensor_name(names, f"{weight.hf_name}.weight")
        codes, scale = _ggml_row_order(name, weight.codes(), weight.scale, family, config)
        contents.tensors.append((name, q4_0_blocks(codes, scale), gguf.GGMLQuantizationType.Q4_0))
        deviation = max(deviation, rounding_deviation(weight.scale, "float16"))
    if weights:
        groups = sorted({w.group_size for w in weights})
        contents.op_mapping[f"qgraph::int4_linear x{len(weights)}"] = (
            f"Q4_0 blocks (codes as trained, fp16 scale per 32 weights; groups {groups})")
        contents.notes.append(
            "Q4_0 scales are fp16: the trained fp32 scales are exact" if deviation == 0.0 else
            f"Q4_0 scales are fp16: the trained fp32 scales moved by up to {deviation:.2e} of themselves "
            f"(fp16 rounding allows {FP16_ROUNDING:.1e})")
    _add_float_tensors(contents, module, family, names, options)
    contents.scale_deviation = deviation
    window = getattr(config, "sliding_window", None)
    if family.arch == "llama" and window and window < config.max_position_embeddings:
        contents.notes.append(f"the model's sliding window ({window} tokens) is not stored: llama.cpp's llama "
                              f"architecture attends to the whole context, the same up to {window} tokens")
    return contents


def check_tolerances(scale_deviation: float, layers: int, runtime: str) -> tuple[float, float]:
    """(absolute, relative to the logits' range) tolerance for the file's logits against the module's.

    transformers computes in float32 with the file's weights, which differ from the module's only by the
    fp16 rounding of each scale (at most `scale_deviation` of each weight). A layer adds two such perturbed
    residual branches (attention, MLP), each moving its output by about that fraction: the logits move by up
    to ~2 * layers * deviation of their range. Exact scales leave float32 noise. llama.cpp adds its own
    8-bit activation rounding, layer after layer (LLAMA_CPP_RELATIVE_TOLERANCE_PER_LAYER).
    """
    if runtime == "llama.cpp":
        return 0.0, layers * LLAMA_CPP_RELATIVE_TOLERANCE_PER_LAYER
    return FLOAT_NOISE, 2 * layers * scale_deviation


def _ggml_row_order(name: str, rows: Tensor, scale: Tensor | None, family: GGUFFamily,
                    config: Any) -> tuple[Tensor, Tensor | None]:
    """q/k rows (codes with their scales, or a bias) in the order llama.cpp's RoPE reads them."""
    if not family.permute_qk or not (".attn_q." in name or ".attn_k." in name):
        return rows, scale
    heads = config.num_attention_heads if ".attn_q." in name else (
        getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    order = ggml_rope_row_order(rows.shape[0], heads)
    return rows[order], None if scale is None else scale[order]


def _add_float_tensors(contents: _Contents, module: QGraphModule, family: GGUFFamily, names: Any,
                       options: GGUFOptions) -> None:
    config = module.info.config
    tensors = float_tensors(module)
    tied = is_tied(module, tensors)
    if tied:
        tensors.pop("lm_head.weight", None)
    embedding_type = EMBEDDING_TYPES[options.embeddings]
    for hf_name, tensor in tensors.items():
        name = gguf_tensor_name(names, hf_name)
        tensor, _ = _ggml_row_order(name, tensor.float(), None, family, config)
        if is_norm(name):
            contents.tensors.append((name, (tensor + family.norm_offset).numpy(), None))
        elif name in ("token_embd.weight", "output.weight"):
            contents.tensors.append((name, *_embedding_data(tensor, embedding_type)))
            contents.embedding_deviation = max(contents.embedding_deviation,
                                               _rounding_deviation(tensor, *contents.tensors[-1][1:]))
        else:
            contents.tensors.append((name, tensor.numpy(), None))
    kind = options.embeddings.upper()
    contents.op_mapping["embedding"] = f"token_embd {kind}"
    if contents.embedding_deviation:
        contents.notes.append(f"embeddings={options.embeddings!r} moved embedding weights by up to "
                              f"{contents.embedding_deviation:.2e} of the largest")
    if not tied:
        contents.op_mapping["LM head"] = f"output {kind}" if "lm_head.weight" in tensors else "output (int4: Q4_0)"
    elif family.tied_output == "copy":
        contents.tensors.append(("output.weight", *_embedding_data(tensors["model.embed_tokens.weight"].float(),
                                                                   embedding_type)))
        contents.op_mapping["LM head (tied)"] = f"output {kind}, a copy of token_embd ({family.arch} requires one)"
    else:
        contents.op_mapping["LM head (tied)"] = "no output tensor: readers use token_embd"
    norm_note = f" + {family.norm_offset:g} (as {family.arch} stores them)" if family.norm_offset else ""
    contents.op_mapping["norms, biases"] = f"F32{norm_note}"


def _rounding_deviation(tensor: Tensor, data: np.ndarray, kind: gguf.GGMLQuantizationType | None) -> float:
    stored = gguf.quants.dequantize(data, kind) if kind is not None else data.astype(np.float32)
    largest = float(tensor.abs().max())
    return float(np.abs(stored - tensor.numpy()).max()) / largest if largest else 0.0


def _embedding_data(tensor: Tensor, kind: gguf.GGMLQuantizationType) -> tuple[np.ndarray, Any]:
    if kind == gguf.GGMLQuantizationType.F32:
        return tensor.numpy(), None
    if kind == gguf.GGMLQuantizationType.F16:
        return tensor.half().numpy(), None
    return gguf.quants.quantize(tensor.numpy(), kind), kind


TARGET = ExportTarget(
    name="gguf",
    suffixes=(".gguf",),
    description="GGUF for llama.cpp (Q4_0 blocks packed from the trained int4 codes); checked in transformers "
                "or llama.cpp",
    options_type=GGUFOptions,
    unsupported=unsupported,
    write=write,
    runner=RUNNERS["transformers"],
    tolerance=FLOAT_NOISE,  # each file's own tolerance comes with its Artifact (check_tolerances)
    takes_tokenizer=True,
)
