"""attach_side_taps: QST's side network (Zhang et al., ACL 2024) placed in the captured graph.

The embedding output (block 0's hidden state in) and the hidden state out of every (k-th) decoder
block are detached and read, with the attention mask, by one `call_module` of a `SideNetwork`. The
head (lm_head, or a classifier's score) then reads `a * h + (1 - a) * upsample(norm(h_gN))` instead of
the final hidden state h. Nothing else changes: the backbone's parameters stay frozen and, since
nothing it computes requires grad, it runs without building an autograd graph.

The head is found by structure, not by name: the first linear outside the decoder blocks whose
input lies downstream of the last block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from qgraph.errors import PassError
from qgraph.graph import Block, LinearSite, decoder_blocks, linear_sites, module_path
from qgraph.pipeline import PassContext, PassResult, PassSpec, options_dict
from qgraph.report import ADDED, REWRITTEN, PassReport, SiteRecord
from qgraph.side_network import DOWNSAMPLE_KINDS, SIDE_MODULE, SideConfig, SideNetwork

PASS_NAME = "attach_side_taps"
MASK_INPUT = "attention_mask"
aten = torch.ops.aten


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

    def __post_init__(self) -> None:
        _check_positive("r", self.r, "16 is the paper's default")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.downsample not in DOWNSAMPLE_KINDS:
            raise ValueError(f"downsample must be one of {', '.join(DOWNSAMPLE_KINDS)}, got {self.downsample!r}")
        _check_positive("adapter_rank", self.adapter_rank, "the adapter's bottleneck width, 16 by default")
        _check_positive("layer_stride", self.layer_stride, "1 taps every layer, 2 every other one")
        if self.heads is not None:
            _check_positive("heads", self.heads, "or None to derive it from the backbone")

    @property
    def trains(self) -> bool:
        """The side network always trains (what the demo asks before loading a model)."""
        return True


def _check_positive(name: str, value: object, hint: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
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
                      heads=heads, blocks=taps - 1, downsample=options.downsample, adapter_rank=options.adapter_rank)


def _device(gm: fx.GraphModule) -> torch.device:
    for tensor in (*gm.parameters(), *gm.buffers()):
        return tensor.device
    return torch.device("cpu")


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
    tapped = tapped_blocks(blocks, options.layer_stride)
    taps = [blocks[0].hidden_in, *(block.hidden_out for block in tapped)]
    config = side_config(gm, blocks, len(taps), options)
    masks = [n for n in gm.graph.find_nodes(op="placeholder") if n.target == MASK_INPUT]

    with torch.random.fork_rng(devices=[]):  # built on the CPU from a private stream, then moved
        torch.manual_seed(options.seed)
        side = SideNetwork(config).to(_device(gm))
    gm.add_submodule(SIDE_MODULE, side)
    graph = gm.graph
    with graph.inserting_before(head.node):
        # detached: the side network's gradients stop here, so none enters the backbone
        detached = [graph.call_function(aten.detach.default, (node,)) for node in (head.input, *taps)]
        side_node = graph.call_module(SIDE_MODULE, (detached[0], masks[0] if masks else None, *detached[1:]))
    head.node.replace_input_with(head.input, side_node)

    context.trainable.setdefault(PASS_NAME, []).extend(f"{SIDE_MODULE}.{name}" for name, _ in side.named_parameters())
    report.matched = len(taps)
    embedding = module_path(blocks[0].hidden_in) or f"{blocks[0].path} input"
    report.records.extend(_tap_records(side, [embedding, *(b.path for b in tapped)]))
    report.records.append(_head_record(side, head))
    if not masks:
        report.notes.append(f"no {MASK_INPUT} input in the graph: the side network treats every token as real")
    return PassResult(gm, modified=True, report=report)


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


def _head_record(side: SideNetwork, head: LinearSite) -> SiteRecord:
    params, nbytes = _param_count(side.norm, side.upsample)
    return SiteRecord(head.path, REWRITTEN, params=params + 1, bytes_after=nbytes + side.mix.element_size(),
                      detail=f"input -> a*h + (1-a)*upsample(norm(h_g)), upsample {side.config.width}->"
                             f"{side.config.backbone_width}, a=1 (starts as the backbone)")


PASS = PassSpec(PASS_NAME, attach_side_taps, SideTapsOptions,
                "QST: detached hidden-state taps feed a side network whose output is mixed into the head's input")
