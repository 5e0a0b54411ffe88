"""attach_side_taps: QST's side network (Zhang et al., ACL 2024) placed in the captured graph.

The embedding output (block 0's hidden state in) and the hidden state out of every (k-th) decoder
block are detached and read, with the attention mask, by one `call_module` of a `SideNetwork`. The
head (lm_head, or a classifier's score) then reads `a * h + (1 - a) * upsample(norm(h_gN))` instead of
the final hidden state h. Nothing else changes: the backbone's parameters stay frozen and, since
nothing it computes requires grad, it runs without building an autograd graph.

The head is found by structure, not by name: the first linear outside the decoder blocks whose
input lies downstream of the last block.

init="pruned" starts each side block as the backbone layer it taps, pruned to the side width
(qgraph/side_init.py has the rule). The layer's weights are read off the graph by structure too: its
linears grouped by the node they read, in order q/k/v (or a fused qkv), o, gate/up (or a fused
gate_up), down; the NF4 ones dequantized as the backbone computes with them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx, nn

from qgraph.errors import PassError
from qgraph.graph import Block, LinearSite, decoder_blocks, get_attr_tensor, linear_sites, module_path
from qgraph.inputs import is_int
from qgraph.loss import LowRankHeadDelta
from qgraph.ops.nf4 import dequantize_nf4
from qgraph.pipeline import PassContext, PassResult, PassSpec, options_dict
from qgraph.report import ADDED, REWRITTEN, PassReport, SiteRecord
from qgraph.rewrite import other_readers, site_weight
from qgraph.side_init import (
    INIT_KINDS, BackboneBlock, check_prunable, choose_block, hidden_scores, pruned_block_state, top_indices,
)
from qgraph.side_network import DOWNSAMPLE_KINDS, MIX_KINDS, SIDE_MODULE, SideConfig, SideNetwork

PASS_NAME = "attach_side_taps"
HEAD_DELTA_MODULE = "qst_head_delta"  # the head's low-rank delta on the GraphModule (head_rank > 0)
DEFAULT_HEAD_RANK = 16  # head_rank=None on a language model's head (tools/bench_qst.py: rank 64 did no better)
MASK_INPUT = "attention_mask"
aten = torch.ops.aten


SIDE_COMPUTE_DTYPES = ("float32", "backbone")


@dataclass(frozen=True)
class SideTapsOptions:
    r: int = 16  # reduction: side width = d / r, side FFN width = FFN width / r
    downsample: str = "adapter"  # adapter, lora, linear, maxpool, avgpool
    adapter_rank: int = 16  # bottleneck of the adapter and lora downsamples
    layer_stride: int = 1  # one side block per k-th backbone layer, counted back from the last
    # side attention heads; None: the backbone's head count, lowered until heads of even size fit
    heads: int | None = None
    # the side network's initial weights come from this seed, not the global RNG (which torch seeds
    # at random in every process): the same plan gives the same module
    seed: int = 0
    # "random": the side blocks drawn from `seed` (the QST reference code); "pruned": each side block
    # starts as the backbone layer it taps, pruned to the side width by weight magnitude (Ladder
    # Side-Tuning; qgraph/side_init.py has the rule), read from the dequantized NF4 weights
    init: str = "random"
    # what the side network computes in (its parameters stay float32 either way): "float32", or "backbone",
    # the backbone's activation dtype under autocast (bf16 after transform(dtype=torch.bfloat16)). float32 by
    # default: at SmolLM2's side width (36) bf16 made the side network's forward and backward 2.5x slower on
    # the CPU (110 -> 271 ms, batch 2 x 128): its matmuls are too narrow to gain, and every op pays the casts
    compute_dtype: str = "float32"
    # how the side output meets the head's input: "gate", a * h + (1 - a) * side with a learned from 1 (the
    # paper's); "channel", the same with one a per feature; "residual", h + side with the upsample starting
    # at 0; or "modulate", the gate's plus h * modulation(side) starting at 0 (qgraph/side_network.py)
    mix: str = "gate"
    # gamma_i's starting value, so every ladder gate b_i = sigmoid(gamma_i) starts at sigmoid(gate_init): 0 starts
    # halfway between a tap and the side block's output; above 0 favours the blocks, so the first blocks' gradients
    # fade less on the way down the ladder (by b per block)
    gate_init: float = 0.0
    # the head (a classifier's score, an untied lm_head) trains too, from its own float32 copy (the user's
    # model keeps its head), as PEFT's task_type="SEQ_CLS" trains QLoRA's: the side network alone can only
    # move the head's input, not the classes it separates. Refused for a head tied to the embedding, where
    # training it would change what the backbone reads
    train_head: bool = False
    # rank of a trainable low-rank term added to the head's logits, up @ (down @ h) (qgraph.loss.LowRankHeadDelta,
    # up from 0 so step 0 is unchanged); 0 for none. The head itself stays frozen (tied or not): the term lets the
    # logits move outside the head's own span, which a correction of h cannot (tools/bench_qst.py, README).
    # None: DEFAULT_HEAD_RANK for a language model's head (measured: SmolLM2's held-out perplexity after 200
    # steps 12.76 -> 12.09, +0.01 GiB), 0 for a classifier's or a head that trains itself (train_head), where
    # nothing was measured
    head_rank: int | None = None

    def __post_init__(self) -> None:
        _check_positive("r", self.r, "16 is the paper's default")
        if self.compute_dtype not in SIDE_COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {', '.join(SIDE_COMPUTE_DTYPES)} (the side network's "
                             f"parameters stay float32 either way), got {self.compute_dtype!r}")
        if self.init not in INIT_KINDS:
            raise ValueError(f"init must be one of {', '.join(INIT_KINDS)}, got {self.init!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if isinstance(self.gate_init, bool) or not isinstance(self.gate_init, (int, float)) \
                or not math.isfinite(self.gate_init):
            raise ValueError(f"gate_init must be a finite number (sigmoid(gate_init) is each gate's start), "
                             f"got {self.gate_init!r}")
        if self.mix not in MIX_KINDS:
            raise ValueError(f"mix must be one of {', '.join(MIX_KINDS)}, got {self.mix!r}")
        if self.downsample not in DOWNSAMPLE_KINDS:
            raise ValueError(f"downsample must be one of {', '.join(DOWNSAMPLE_KINDS)}, got {self.downsample!r}")
        _check_positive("adapter_rank", self.adapter_rank, "the adapter's bottleneck width, 16 by default")
        _check_positive("layer_stride", self.layer_stride, "1 taps every layer, 2 every other one")
        if self.heads is not None:
            _check_positive("heads", self.heads, "or None to derive it from the backbone")
        if not isinstance(self.train_head, bool):
            raise ValueError(f"train_head must be True or False, got {self.train_head!r}")
        if self.head_rank is not None and (not isinstance(self.head_rank, int) or isinstance(self.head_rank, bool)
                                           or self.head_rank < 0):
            raise ValueError(f"head_rank must be None (the default: {DEFAULT_HEAD_RANK} for a language model's head), "
                             f"0 (no head delta) or a positive rank, got {self.head_rank!r}")

    @property
    def trains(self) -> bool:
        """The side network always trains (what the demo asks before loading a model)."""
        return True


def _check_positive(name: str, value: object, hint: str) -> None:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer ({hint}), got {value!r}")


# --- graph queries ------------------------------------------------------------------------------------


def tapped_blocks(blocks: list[Block], stride: int) -> list[Block]:
    """Every `stride`-th block counted back from the last, so the last layer's output is always read."""
    return blocks[::-1][::stride][::-1]


def downstream(node: fx.Node) -> set[fx.Node]:
    seen, todo = {node}, [node]
    while todo:
        for user in todo.pop().users:
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return seen


def find_head(gm: fx.GraphModule, blocks: list[Block]) -> LinearSite:
    """The first linear outside the blocks whose input comes from the last block (LM head, score)."""
    inside = {node for block in blocks for node in block.nodes}
    after_last = downstream(blocks[-1].hidden_out)
    for site in linear_sites(gm):
        if site.node not in inside and site.input in after_last:
            return site
    raise PassError(
        f"{PASS_NAME}: found no linear head reading the output of the last decoder block ({blocks[-1].path}); "
        "QST mixes the side network into the head's input, so the model needs a linear head "
        "(lm_head or a classifier's score) that is not quantized: keep it out of quantize_nf4's include")


def scores_vocabulary(gm: fx.GraphModule, head: LinearSite) -> bool:
    """Whether the head scores the token vocabulary: the graph embeds tokens from a table with one row per
    head output (a language model's lm_head, tied or not), as opposed to a classifier's few classes."""
    def table_rows(node: fx.Node) -> int | None:
        if node.op == "call_function" and node.target is aten.embedding.default:
            value = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
            return int(value.shape[0]) if isinstance(value, torch.Tensor) else None
        if node.op == "call_module" and isinstance(module := gm.get_submodule(str(node.target)), nn.Embedding):
            return module.num_embeddings
        return None

    return any(table_rows(node) == head.out_features for node in gm.graph.nodes)


def resolved_head_rank(options: SideTapsOptions, vocabulary: bool) -> int:
    """The head delta's rank: head_rank as given, or for None the default where it was measured (a language
    model's head that does not train itself) and 0 elsewhere."""
    if options.head_rank is not None:
        return options.head_rank
    return DEFAULT_HEAD_RANK if vocabulary and not options.train_head else 0


def width_of(node: fx.Node) -> int:
    return int(node.meta["val"].shape[-1])


def ffn_width(block: Block, hidden: int) -> int:
    """The widest (batch, seq, features) activation inside a block: its MLP's inner width.

    Read off the graph (after quantization no linear is left to ask), so no config name is assumed."""
    widths = [int(val.shape[-1]) for node in block.nodes
              if isinstance(val := node.meta.get("val"), torch.Tensor) and val.dim() == 3]
    return max(widths, default=hidden)


def default_heads(width: int, backbone_heads: int | None) -> int | None:
    """The backbone's head count, lowered to the largest that splits `width` into heads of even size."""
    for heads in range(min(backbone_heads or width, width), 0, -1):
        if width % heads == 0 and (width // heads) % 2 == 0:
            return heads
    return None


def side_config(gm: fx.GraphModule, blocks: list[Block], taps: int, options: SideTapsOptions) -> SideConfig:
    """The side network's sizes, or a PassError naming the option to change."""
    hidden = width_of(blocks[0].hidden_out)
    if hidden % options.r:
        divisors = [r for r in range(2, min(hidden, 64) + 1) if hidden % r == 0 and (hidden // r) % 2 == 0]
        raise PassError(f"{PASS_NAME}: r={options.r} does not divide the hidden size {hidden}; nothing was "
                        f"changed. Fix: pick r among {divisors}")
    width = hidden // options.r
    info = gm.meta.get("qgraph")
    backbone_heads = getattr(getattr(info, "config", None), "num_attention_heads", None)
    heads = options.heads or default_heads(width, backbone_heads)
    if heads is None or width % heads or (width // heads) % 2:
        raise PassError(f"{PASS_NAME}: the side width d/r = {hidden}/{options.r} = {width} does not split into "
                        f"{heads or 'any number of'} attention heads of even size (rotary positions rotate pairs "
                        "of features); nothing was changed. Fix: pick r so that d/r is even, or set heads to a "
                        f"divisor of {width} that leaves an even head size")
    return SideConfig(backbone_width=hidden, width=width, ffn_width=max(1, ffn_width(blocks[0], hidden) // options.r),
                      heads=heads, blocks=taps - 1, downsample=options.downsample, adapter_rank=options.adapter_rank,
                      mix=options.mix)


def _activation_dtype(head: LinearSite) -> torch.dtype | None:
    """The dtype the backbone hands the head (what the side network computes in), None where unrecorded."""
    value = head.input.meta.get("val")
    return value.dtype if isinstance(value, torch.Tensor) and value.is_floating_point() else None


def _device(gm: fx.GraphModule) -> torch.device:
    for tensor in (*gm.parameters(), *gm.buffers()):
        return tensor.device
    return torch.device("cpu")


# --- "pruned" init: the backbone's weights, read off the graph ----------------------------------------------

NF4_LINEAR = torch.ops.qgraph.nf4_linear.default


@dataclass(frozen=True)
class BlockLinear:
    """One linear inside a decoder block: its node, the node it reads and its weight (out, in), float32."""

    node: fx.Node
    input: fx.Node
    weight: torch.Tensor


def _attr(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    return get_attr_tensor(gm, node.target) if isinstance(node, fx.Node) and node.op == "get_attr" else None


def block_linears(gm: fx.GraphModule, block: Block, plain: dict[fx.Node, LinearSite]) -> list[BlockLinear]:
    """The block's linears in graph order, NF4 ones dequantized (what the backbone computes with)."""
    linears = []
    for node in block.nodes:
        if node.op == "call_function" and node.target == NF4_LINEAR:
            x, packed, absmax, code, nested_absmax, nested_code, offset, _bias, *sizes = node.args
            tensors = [_attr(gm, n) for n in (packed, absmax, code, nested_absmax, nested_code, offset)]
            linears.append(BlockLinear(node, x, dequantize_nf4(*tensors, *sizes).float()))
        elif node in plain:
            linears.append(BlockLinear(node, plain[node].input, site_weight(gm, plain[node]).float()))
    return linears


def groups_by_input(linears: list[BlockLinear]) -> list[list[BlockLinear]]:
    """Linears that read the same node, in order of first appearance: q/k/v, o, gate/up, down."""
    groups: dict[fx.Node, list[BlockLinear]] = {}
    for linear in linears:
        groups.setdefault(linear.input, []).append(linear)
    return list(groups.values())


def norm_weight(gm: fx.GraphModule, node: fx.Node, width: int) -> torch.Tensor | None:
    """The norm weight that scales `node` (a norm's output): a (width,) attribute it reads directly, as
    RMSNorm's `weight * x` and layer_norm(x, shape, weight, bias) do. None where there is none, or where
    the weight is transformed first (Gemma's 1 + w), which the side block's plain RMSNorm could not copy."""
    for arg in node.args:
        tensor = _attr(gm, arg)
        if tensor is not None and tuple(tensor.shape) == (width,):
            return tensor.detach().float()
    return None


# ops that pass a tensor on unchanged in width between the final norm and the head (logits_to_keep's slice; the
# detach this pass puts in front of the side network's copy of the head's input)
PASS_THROUGH = (aten.alias.default, aten.slice.Tensor, aten.view.default, aten.clone.default, aten.detach.default)


def final_norm_weight(gm: fx.GraphModule, head_input: fx.Node, width: int) -> torch.Tensor | None:
    """The final norm's weight, read through the views and slices between it and the head."""
    node = head_input
    while node.op == "call_function" and node.target in PASS_THROUGH and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return norm_weight(gm, node, width)


def split_rows(weight: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(weight.split(sizes, dim=0))


def gated_mlp_inputs(group: list[BlockLinear], ffn: int, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) of a gated MLP: two linears, the gate being the one whose output passes an activation
    before the product (Llama's silu(gate(x)) * up(x)), or one fused linear of twice the FFN width whose
    first half is the gate (Phi-3's gate_up_proj)."""
    if len(group) == 2:
        first, second = group
        up_first = all(user.target == aten.mul.Tensor for user in first.node.users)
        gate, up = (second, first) if up_first else (first, second)
        return gate.weight, up.weight
    if len(group) == 1 and group[0].weight.shape[0] == 2 * ffn:
        gate, up = split_rows(group[0].weight, [ffn, ffn])
        return gate, up
    widths = [linear.weight.shape[0] for linear in group]
    raise PassError(f"{PASS_NAME}: init='pruned' copies a gated MLP (gate and up linears feeding down, as "
                    f"Llama's SwiGLU) into the side block's; {path}'s MLP reads its input with linears of widths "
                    f"{widths} (an ungated MLP, as GPT-2's). Fix: use init='random' for this model")


def backbone_block(gm: fx.GraphModule, block: Block, heads: int, kv_heads: int,
                   plain: dict[fx.Node, LinearSite]) -> BackboneBlock:
    """The block's attention and MLP weights, found by structure: four groups of linears by input, in order
    (q/k/v or a fused qkv, o, gate/up or a fused gate_up, down), the norms as the weights scaling the
    inputs of the first and third groups."""
    groups = groups_by_input(block_linears(gm, block, plain))
    if len(groups) != 4 or len(groups[1]) != 1 or len(groups[3]) != 1:
        names = [[module_path(linear.node) for linear in group] for group in groups]
        raise PassError(f"{PASS_NAME}: init='pruned' reads a decoder block as attention then MLP (four groups "
                        f"of linears by input: q/k/v, o, gate/up, down); {block.path} has {len(groups)}: {names}. "
                        "Fix: use init='random' for this model")
    attn_in, (attn_out,), mlp_in, (mlp_out,) = groups
    width = attn_out.weight.shape[0]
    if len(attn_in) == 3:
        q, k, v = (linear.weight for linear in attn_in)
    elif len(attn_in) == 1:  # fused qkv: H + 2 KV heads of equal size, in that order (GPT-2, Phi-3)
        rows = attn_in[0].weight.shape[0]
        head_dim = rows // (heads + 2 * kv_heads)
        q, k, v = split_rows(attn_in[0].weight, [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
    else:
        raise PassError(f"{PASS_NAME}: init='pruned' expects q, k and v as three linears or one fused linear; "
                        f"{block.path}'s attention reads its input with {len(attn_in)}. Fix: use init='random'")
    gate, up = gated_mlp_inputs(mlp_in, mlp_out.weight.shape[1], block.path)
    if q.shape[0] % heads or k.shape[0] * heads != q.shape[0] * kv_heads or v.shape != k.shape:
        raise PassError(f"{PASS_NAME}: {block.path}'s q/k/v widths {q.shape[0]}/{k.shape[0]}/{v.shape[0]} do not "
                        f"split into the config's {heads} query and {kv_heads} key/value heads. Fix: use "
                        "init='random' for this model")
    return BackboneBlock(q=q, k=k, v=v, o=attn_out.weight, gate=gate, up=up, down=mlp_out.weight,
                         attn_norm=norm_weight(gm, attn_in[0].input, width),
                         mlp_norm=norm_weight(gm, mlp_in[0].input, width), heads=heads, kv_heads=kv_heads)


def head_counts(gm: fx.GraphModule) -> tuple[int, int]:
    """(query heads, key/value heads) from the captured model's config."""
    config = getattr(gm.meta.get("qgraph"), "config", None)
    heads = getattr(config, "num_attention_heads", None)
    if not heads:
        raise PassError(f"{PASS_NAME}: init='pruned' needs the backbone's attention head count "
                        "(config.num_attention_heads), and this model has no config with one. Fix: use init='random'")
    return int(heads), int(getattr(config, "num_key_value_heads", None) or heads)


@dataclass(frozen=True)
class PrunedInit:
    """Everything the pruned init copies: the shared hidden channels, each side block's state, the side norm."""

    hidden: torch.Tensor
    block_states: list[dict[str, torch.Tensor]]
    norm: torch.Tensor | None


def pruned_init(gm: fx.GraphModule, tapped: list[Block], head: LinearSite, config: SideConfig) -> PrunedInit:
    """The side blocks' weights pruned from the tapped backbone blocks (one per side block; the embedding tap
    has none), or a PassError naming the fix. Reads the graph only."""
    heads, kv_heads = head_counts(gm)
    plain = {site.node: site for site in linear_sites(gm)}  # found once: every block reads from it
    blocks = [backbone_block(gm, block, heads, kv_heads, plain) for block in tapped]
    for block, path in zip(blocks, (b.path for b in tapped)):
        problem = check_prunable(block, config.heads, config.head_dim, config.ffn_width)
        if problem:
            raise PassError(f"{PASS_NAME}: init='pruned' cannot prune {path} to the side block: {problem}; "
                            "nothing was changed")
    hidden = top_indices(hidden_scores(blocks), config.width)
    choices = [choose_block(block, config.heads, config.head_dim, config.ffn_width) for block in blocks]
    final_norm = final_norm_weight(gm, head.input, config.backbone_width)
    return PrunedInit(hidden, [pruned_block_state(b, c, hidden) for b, c in zip(blocks, choices)],
                      None if final_norm is None else final_norm[hidden])


def load_pruned(side: SideNetwork, init: PrunedInit) -> None:
    """Copy the pruned weights into the side network (its own dtype and device).

    A `linear` downsample starts as the selection of the kept channels, so each tap reaches the side
    stream in the channels the pruned blocks were cut to read; the other downsamples have no such
    natural start and keep their random one."""
    with torch.no_grad():
        for block, state in zip(side.blocks, init.block_states, strict=True):
            block.load_state_dict(state)
        if init.norm is not None:
            side.norm.weight.copy_(init.norm)
        if side.config.downsample == "linear":
            for down in side.downsamples:
                down.load_state_dict(selection_linear(init.hidden, side.config.backbone_width))


def selection_linear(kept: torch.Tensor, width: int) -> dict[str, torch.Tensor]:
    """An nn.Linear(width, len(kept))'s state that returns x[..., kept]."""
    weight = torch.zeros(len(kept), width)
    weight[torch.arange(len(kept)), kept] = 1.0
    return {"weight": weight, "bias": torch.zeros(len(kept))}


# --- a trainable head -----------------------------------------------------------------------------------


def head_tensor_names(head: LinearSite) -> list[str]:
    return [head.weight_name, *([head.bias_name] if head.bias_name else [])]


def check_trainable_head(gm: fx.GraphModule, head: LinearSite) -> None:
    """train_head=True needs a float32 head of its own: raised before the graph changes."""
    tied = other_readers(gm, head)  # the tied-weight check quantize_nf4 and lrqat use
    if tied:
        readers = ", ".join(sorted({module_path(node) or node.name for node in tied}))
        raise PassError(f"{PASS_NAME}: train_head=True, but the head {head.path}'s weight is also read by {readers} "
                        "(tied to the embedding): training it would change what the backbone reads, and gradient "
                        "would enter the backbone; nothing was changed. Fix: leave train_head False, or untie the "
                        "weights before transform (config.tie_word_embeddings=False and a copy of the embedding)")
    for name in head_tensor_names(head):
        tensor = get_attr_tensor(gm, name)
        if tensor.dtype != torch.float32:
            raise PassError(f"{PASS_NAME}: train_head=True, but the head {head.path} computes in {tensor.dtype}, "
                            "where every update below 2^-8 of a weight is lost; nothing was changed. Fix: transform "
                            "the float32 model (no dtype=), or leave train_head False")


def own_head_parameters(gm: fx.GraphModule, head: LinearSite, context: PassContext) -> list[str]:
    """Give the graph its own copy of the head's weight (and bias) to train, so the user's model keeps its head;
    made once, so a second graph of the model (qgraph.decode) trains the same copy. Returns their names."""
    names = head_tensor_names(head)
    for name in names:
        owner, _, attr = name.rpartition(".")
        module = gm.get_submodule(owner)
        module._parameters[attr] = context.make_once(
            (PASS_NAME, "head", name), lambda name=name: nn.Parameter(get_attr_tensor(gm, name).detach().clone()))
    return names


# --- the rewrite ----------------------------------------------------------------------------------------


def attach_side_taps(gm: fx.GraphModule, context: PassContext, options: SideTapsOptions) -> PassResult:
    report = PassReport(PASS_NAME, options_dict(options))
    blocks = decoder_blocks(gm)
    if not blocks:
        raise PassError(f"{PASS_NAME}: this graph has no repeated decoder blocks to tap; QST needs a decoder model")
    if options.layer_stride > len(blocks):
        raise PassError(f"{PASS_NAME}: layer_stride={options.layer_stride} exceeds the {len(blocks)} decoder "
                        f"layers; nothing was changed. Fix: use a layer_stride from 1 to {len(blocks)}")
    if hasattr(gm, SIDE_MODULE):
        raise PassError(f"{PASS_NAME}: the graph already has a side network ({SIDE_MODULE}); run the pass once")
    # every check (and the head search) happens before the graph changes
    head = find_head(gm, blocks)
    if options.train_head:
        check_trainable_head(gm, head)
    tapped = tapped_blocks(blocks, options.layer_stride)
    taps = [blocks[0].hidden_in, *(block.hidden_out for block in tapped)]
    config = side_config(gm, blocks, len(taps), options)
    masks = [n for n in gm.graph.find_nodes(op="placeholder") if n.target == MASK_INPUT]
    # a second graph of the model (qgraph.decode) gets this same module
    side, pruned = context.make_once((PASS_NAME, SIDE_MODULE), lambda: _side_network(gm, tapped, head, config, options))
    gm.add_submodule(SIDE_MODULE, side)
    graph = gm.graph
    with graph.inserting_before(head.node):
        # detached: the side network's gradients stop here, so none enters the backbone
        detached = [graph.call_function(aten.detach.default, (node,)) for node in (head.input, *taps)]
        side_node = graph.call_module(SIDE_MODULE, (detached[0], masks[0] if masks else None, *detached[1:]))
    head.node.replace_input_with(head.input, side_node)

    trainable = context.trainable.setdefault(PASS_NAME, [])
    trainable.extend(f"{SIDE_MODULE}.{name}" for name, _ in side.named_parameters())
    if options.train_head:
        trainable.extend(own_head_parameters(gm, head, context))
    head_rank = resolved_head_rank(options, scores_vocabulary(gm, head))
    if head_rank:
        add_head_delta(gm, head, side_node, context, head_rank, options.seed)
        trainable.extend(f"{HEAD_DELTA_MODULE}.{name}" for name in ("down", "up"))
    report.matched = len(taps)
    embedding = module_path(blocks[0].hidden_in) or f"{blocks[0].path} input"
    report.records.extend(_tap_records(side, [embedding, *(b.path for b in tapped)]))
    report.records.append(_head_record(side, head, options.train_head))
    if head_rank:
        delta = gm.get_submodule(HEAD_DELTA_MODULE)
        why = "; head_rank=None: the default for a language model's head" if options.head_rank is None else ""
        report.records.append(SiteRecord(
            f"{head.path} ({HEAD_DELTA_MODULE})", ADDED, params=delta.down.numel() + delta.up.numel(),
            bytes_after=delta.down.nbytes + delta.up.nbytes,
            detail=f"logits + up @ (down @ h), rank {head_rank}, up from 0 (starts as the head){why}"))
    report.notes.append(_init_note(options, pruned, config))
    if not masks:
        report.notes.append(f"no {MASK_INPUT} input in the graph: the side network treats every token as real")
    return PassResult(gm, modified=True, report=report)


def add_head_delta(gm: fx.GraphModule, head: LinearSite, head_input: fx.Node, context: PassContext,
                   rank: int, seed: int) -> None:
    """head(h) -> head(h) + delta(h): a LowRankHeadDelta of `head_input`, made once (a second graph of the model
    gets the same one), drawn from the side network's seed stream."""
    def make() -> LowRankHeadDelta:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)  # not the side network's own draw
            return LowRankHeadDelta(head.in_features, head.out_features, rank).to(_device(gm))

    gm.add_submodule(HEAD_DELTA_MODULE, context.make_once((PASS_NAME, HEAD_DELTA_MODULE), make))
    graph = gm.graph
    with graph.inserting_after(head.node):
        delta = graph.call_module(HEAD_DELTA_MODULE, (head_input,))
    with graph.inserting_after(delta):
        total = graph.call_function(aten.add.Tensor, (head.node, delta))
    head.node.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)


def _side_network(gm: fx.GraphModule, tapped: list[Block], head: LinearSite, config: SideConfig,
                  options: SideTapsOptions) -> tuple[SideNetwork, PrunedInit | None]:
    pruned = pruned_init(gm, tapped, head, config) if options.init == "pruned" else None
    with torch.random.fork_rng(devices=[]):  # built on the CPU from a private stream, then moved
        torch.manual_seed(options.seed)
        compute = _activation_dtype(head) if options.compute_dtype == "backbone" else None
        side = SideNetwork(config, compute_dtype=compute)  # gates and upsample: random either way
        with torch.no_grad():
            side.gates.fill_(options.gate_init)
    if pruned is not None:
        load_pruned(side, pruned)
    return side.to(_device(gm)), pruned


def _init_note(options: SideTapsOptions, pruned: PrunedInit | None, config: SideConfig) -> str:
    if pruned is None:
        return f"init='random': side network drawn from seed {options.seed}"
    shown = ", ".join(map(str, pruned.hidden[:8].tolist())) + (", ..." if config.width > 8 else "")
    norm = "" if pruned.norm is not None else " (none found: ones)"
    random_part = ("the linear downsamples select the kept channels; gates" if config.downsample == "linear"
                   else "downsamples, gates")
    return (f"init='pruned': each side block copies its tapped backbone layer's dequantized weights pruned by "
            f"L2 norm: {config.width} of {config.backbone_width} hidden channels (shared: {shown}), "
            f"{config.heads} heads of size {config.head_dim}, FFN {config.ffn_width}; side norm from the final "
            f"norm{norm}; {random_part} and upsample drawn from seed {options.seed}")


def _param_count(*modules: nn.Module) -> tuple[int, int]:
    params = [p for m in modules for p in m.parameters(recurse=True)]
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def _tap_records(side: SideNetwork, paths: list[str]) -> list[SiteRecord]:
    config = side.config
    down = (f"{config.downsample} {config.backbone_width}->{config.adapter_rank}->{config.width}"
            if config.downsample in ("adapter", "lora") else f"{config.downsample} {config.backbone_width}->{config.width}")
    records = []
    for i, path in enumerate(paths):
        modules = [side.downsamples[i]] + ([side.blocks[i - 1]] if i else [])
        params, nbytes = _param_count(*modules)
        block = f"; side block {i - 1} (width {config.width}, ffn {config.ffn_width}, {config.heads} heads), gate" if i else ""
        gate = (1, side.gates.element_size()) if i else (0, 0)  # one entry of the gates vector
        records.append(SiteRecord(path, ADDED, params=params + gate[0], bytes_after=nbytes + gate[1],
                                  detail=f"tap {i}: detach -> {down}{block}"))
    return records


def _head_record(side: SideNetwork, head: LinearSite, train_head: bool) -> SiteRecord:
    modulation = [side.modulation] if side.config.mix == "modulate" else []
    params, nbytes = _param_count(side.norm, side.upsample, *modulation)
    upsample = f"upsample {side.config.width}->{side.config.backbone_width}"
    head_params = head.in_features * head.out_features + (head.out_features if head.bias_name else 0)
    trained = f"; the head's own {head_params} parameters train too" if train_head else ""
    if train_head:
        params, nbytes = params + head_params, nbytes + head_params * 4
    if side.config.mix == "residual":
        return SiteRecord(head.path, REWRITTEN, params=params, bytes_after=nbytes,
                          detail=f"input -> h + upsample(norm(h_g)), {upsample} starting at 0 (starts as the "
                                 f"backbone){trained}")
    gate = f"a ({side.mix.numel()} features)" if side.config.mix == "channel" else "a"
    modulated = " + h*modulation(norm(h_g))" if modulation else ""
    return SiteRecord(head.path, REWRITTEN, params=params + side.mix.numel(), bytes_after=nbytes + side.mix.nbytes,
                      detail=f"input -> a*h + (1-a)*upsample(norm(h_g)){modulated}, {upsample}, {gate}=1 "
                             f"(starts as the backbone){trained}")


PASS = PassSpec(PASS_NAME, attach_side_taps, SideTapsOptions,
                "QST: detached hidden-state taps feed a side network whose output is mixed into the head's input")
