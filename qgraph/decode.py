"""The KV-cached decode graph: what `qm.generate` runs, one new token per step, instead of the whole sequence.

A second graph of a Hugging Face causal LM, beside the training graph, with the model's own KV cache as
explicit inputs and outputs:

    decode(input_ids (B, T), attention_mask (B, T), past_attention_mask (B, P), position_ids (B, T),
           past [k_0, v_0, k_1, v_1, ...] (B, kv_heads, P, head_dim)) -> (logits (B, T, V), present k/v (P + T))

(a QST side network's blocks' keys and values follow the model's in past and present, each (B, side heads, P,
side head_dim)).

`transform` keeps a `DecodeRecipe` and the graph is built at the first generate: captured from a stand-in of
the model (every tensor zero-stride, so the recipe keeps no weight alive), rewritten by the plan's passes
(not the training-only ones: no checkpoints, the head stays in the graph) with stand-ins of what the
training graph's passes made (`PassContext.made`: nothing is quantized or range-searched again), then every
tensor and module tied by name to the training graph's, so the two share them: training moves what decoding
reads. The tie is repeated before each generation, so `qm.to(...)` or a loaded state reach it too.

A prompt goes through the same graph: its past is one slot of zeros that the mask hides (torch.export
cannot keep a dimension dynamic that is 0 in use), and positions count from 0 as the uncached graph's do.
A QST side network's blocks attend to their own keys and values: they follow the model's in `past` and
`present` (`thread_side_cache`), so a file exported from the decode graph carries them too.
"""

from __future__ import annotations

import dataclasses
import operator
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from qgraph.capture import EXAMPLE_BATCH, MAX_BATCH, structural_copy
from qgraph.errors import QGraphError
from qgraph.inference_graph import InferenceGraph, inference_graph
from qgraph.pipeline import PassContext, run_pipeline
from qgraph.plans import CHECKPOINT_PASS
from qgraph.side_network import SIDE_MODULE, SideNetwork, side_network_call

# the decode signature's arguments before the past keys and values
DECODE_ARGUMENTS = ("input_ids", "attention_mask", "past_attention_mask", "position_ids")
# Passes whose work only training needs: the decode graph runs without them, and finalize undoes them.
TRAINING_ONLY_PASSES = (CHECKPOINT_PASS, "chunk_lm_loss")
EXAMPLE_NEW, EXAMPLE_PAST = 4, 3  # > 1 and unequal, so export keeps both dims dynamic and apart


class CachedForward(nn.Module):
    """The model called with its KV cache as flat tensors. It holds the model's children under their own
    names, so the captured graph's attributes are named exactly as the training graph's are."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.__dict__["wrapped"] = model  # called, not registered: its children are, under their names
        for name, child in model.named_children():
            self.add_module(name, child)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, past_attention_mask: Tensor,
                position_ids: Tensor, past: list[Tensor]) -> tuple[Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache()  # full layers: a sliding window lives in the mask, the keys stay whole
        for layer in range(len(past) // 2):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.wrapped(input_ids=input_ids, attention_mask=torch.cat([past_attention_mask, attention_mask], 1),
                         position_ids=position_ids, cache=cache, use_cache=True)
        present = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


@dataclass(frozen=True)
class CacheShape:
    """A stack of layers' keys and values, each (B, heads, tokens, head_dim) in `dtype`: the model's, or a QST side
    network's."""

    layers: int
    heads: int
    head_dim: int
    dtype: torch.dtype

    def empty(self, batch: int, device: torch.device) -> list[Tensor]:
        """The past of a prompt: one slot of zeros per key and value (hidden by past_attention_mask)."""
        return [torch.zeros(batch, self.heads, 1, self.head_dim, dtype=self.dtype, device=device)
                for _ in range(2 * self.layers)]


@dataclass
class DecodeGraph:
    graph_module: fx.GraphModule
    model_cache: CacheShape
    example_inputs: dict[str, Any]  # by placeholder name: what a pass run on it verifies with
    seconds: float  # capture and passes
    inference: InferenceGraph | None = field(default=None, repr=False)  # made at the first generation
    side_cache: CacheShape | None = None  # a QST side network's, after the model's in past and present

    @property
    def caches(self) -> tuple[CacheShape, ...]:
        """Every stack of keys and values `past` holds, in its order."""
        return (self.model_cache,) if self.side_cache is None else (self.model_cache, self.side_cache)

    @property
    def past_count(self) -> int:
        """How many tensors `past` (and `present`) holds."""
        return sum(2 * cache.layers for cache in self.caches)

    def empty_past(self, batch: int, device: torch.device) -> list[Tensor]:
        """The past of a prompt, every stack's `CacheShape.empty` in order."""
        return [t for cache in self.caches for t in cache.empty(batch, device)]

    def inference_module(self) -> fx.GraphModule:
        """graph_module's generation-only form (qgraph.inference_graph), reading its tensors as they are now."""
        if self.inference is None:
            self.inference = inference_graph(self.graph_module)
        return self.inference.refresh(self.graph_module)


def cache_shape(model: nn.Module) -> CacheShape:
    """Read off one cached forward of a token: every family names its head counts differently."""
    ids = torch.ones(1, 1, dtype=torch.long, device=next(model.parameters()).device)
    with torch.no_grad():
        layers = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True).cache.layers
    keys = layers[0].keys
    return CacheShape(len(layers), int(keys.shape[1]), int(keys.shape[3]), keys.dtype)


def example_inputs(model: nn.Module, shape: CacheShape) -> tuple[Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(model.config.vocab_size), (EXAMPLE_BATCH, EXAMPLE_NEW), generator=generator)
    past = [torch.randn(EXAMPLE_BATCH, shape.heads, EXAMPLE_PAST, shape.head_dim, generator=generator)
            .to(device, shape.dtype) for _ in range(2 * shape.layers)]
    # contiguous, as callers pass them: an expanded example (stride 0 across rows) compiles an AOTInductor
    # package that reads every row's positions from the first and refuses contiguous ones when checked
    positions = torch.arange(EXAMPLE_PAST, EXAMPLE_PAST + EXAMPLE_NEW).repeat(EXAMPLE_BATCH, 1)
    return (ids.to(device), torch.ones_like(ids, device=device),
            torch.ones(EXAMPLE_BATCH, EXAMPLE_PAST, dtype=torch.long, device=device), positions.to(device), past)


def drop_empty_concat_inputs(gm: fx.GraphModule) -> None:
    """Remove the empty 1-d tensors a DynamicCache starts each layer with from the concatenations that append
    the past to them: torch concatenates a legacy empty tensor with anything, ONNX does not."""
    for node in list(gm.graph.find_nodes(op="call_function", target=torch.ops.aten.cat.default)):
        inputs = node.args[0]
        kept = [x for x in inputs if not _is_empty_vector(x)]
        if len(kept) == len(inputs) or not kept:
            continue
        if len(kept) == 1:
            node.replace_all_uses_with(kept[0])
            gm.graph.erase_node(node)
        else:
            node.args = (kept, *node.args[1:])
    _erase_unused_constants(gm)
    gm.graph.lint()
    gm.recompile()


def _is_empty_vector(node: Any) -> bool:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(value, Tensor) and value.dim() == 1 and value.shape[0] == 0


def _erase_unused_constants(gm: fx.GraphModule) -> None:
    """The lifted constants nothing reads any more, with the copy/detach chain that read them."""
    chain = {torch.ops.aten.lift_fresh_copy.default, torch.ops.aten.detach_.default, torch.ops.aten.detach.default}
    changed = True
    while changed:
        changed = False
        for node in reversed(list(gm.graph.nodes)):
            unused = not node.users and (node.op == "get_attr" or (node.op == "call_function" and node.target in chain))
            if unused and (node.op != "get_attr" or node.target.startswith("lifted_tensor")):
                target = node.target if node.op == "get_attr" else None
                gm.graph.erase_node(node)
                if target is not None and not gm.graph.find_nodes(op="get_attr", target=target):
                    delattr(gm, target)
                changed = True


def dynamic_shapes(past_count: int, max_seq_len: int) -> tuple:
    """Batch, new tokens and past tokens dynamic, in the decode signature's argument order (`past_count` past
    keys and values)."""
    batch = Dim("batch", min=1, max=MAX_BATCH)
    new, past = Dim("seq", min=1, max=max_seq_len), Dim("past", min=1, max=max_seq_len)
    return ({0: batch, 1: new}, {0: batch, 1: new}, {0: batch, 1: past}, {0: batch, 1: new},
            [{0: batch, 2: past} for _ in range(past_count)])


def signature_args(examples: dict[str, Any]) -> tuple:
    """The decode signature's arguments from inputs by placeholder name (past_0, past_1, ... into one list)."""
    values = list(examples.values())
    return (*values[:len(DECODE_ARGUMENTS)], values[len(DECODE_ARGUMENTS):])


def capture_decode(model: nn.Module, max_seq_len: int) -> tuple[fx.GraphModule, dict[str, Any], CacheShape]:
    """The cached graph of `model` (not yet rewritten), its example inputs by placeholder, its cache shape."""
    shape = cache_shape(model)
    args = example_inputs(model, shape)
    gm = torch.export.export(CachedForward(model), args, dynamic_shapes=dynamic_shapes(2 * shape.layers, max_seq_len),
                             strict=False).module()
    drop_empty_concat_inputs(gm)
    names = [node.target for node in gm.graph.find_nodes(op="placeholder")]
    return gm, dict(zip(names, pytree.tree_leaves(args))), shape


def build_decode_graph(model: nn.Module, steps: Sequence[tuple[Any, Any]], made: dict[Any, Any], *,
                       max_seq_len: int, skip: Sequence[str] = ()) -> DecodeGraph:
    """Capture the cached graph and run `steps` (the plan's, minus TRAINING_ONLY_PASSES) on it, sharing what
    the training graph's passes made (`made`, their PassContext's)."""
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        gm, examples, shape = capture_decode(model, max_seq_len)
    finally:
        model.train(was_training)
    decode_steps = [(spec, options) for spec, options in steps if spec.name not in TRAINING_ONLY_PASSES]
    gm, _ = run_pipeline(gm, decode_steps, PassContext(example_inputs=examples, made=made), skip=skip)
    side_cache = thread_side_cache(gm, examples)
    return DecodeGraph(gm, shape, examples, time.perf_counter() - start, side_cache=side_cache)


def thread_side_cache(gm: fx.GraphModule, examples: dict[str, Any]) -> CacheShape | None:
    """Give a QST side network's call (attach_side_taps') its blocks' keys and values as the graph's own inputs
    and outputs, after the model's: past_2L, ... in, present_2L, ... out, under past_attention_mask as the
    model's are. Adds their example inputs to `examples`. Returns the side network's cache shape, or None (and
    changes nothing) when the graph calls no side network.

    Explicit rather than kept by the module between calls, so that every target that exports the decode graph
    carries the side network's cache with the model's, and nothing outlives a generation. Like the model's, its
    dtype is fixed here (the side network's compute dtype)."""
    call = side_network_call(gm)
    if call is None:
        return None
    if "past" in call.kwargs:
        raise QGraphError("thread_side_cache: this decode graph's side network already reads its cache")
    side: SideNetwork = gm.get_submodule(SIDE_MODULE)
    shape = CacheShape(side.config.blocks, side.config.heads, side.config.head_dim, side.effective_dtype())
    graph = gm.graph
    placeholders = {node.target: node for node in graph.find_nodes(op="placeholder")}
    model_past = len(placeholders) - len(DECODE_ARGUMENTS)  # past_0 ... past_(2L-1), the model's, come first
    past, previous = [], list(placeholders.values())[-1]
    device = examples["past_0"].device
    # a fixed generator of its own: reproducible examples, drawn without moving the model's (seed 0, drawn earlier)
    generator = torch.Generator().manual_seed(1)
    for index in range(model_past, model_past + 2 * shape.layers):
        with graph.inserting_after(previous):
            previous = graph.placeholder(f"past_{index}")
        past.append(previous)
        examples[previous.target] = torch.randn(EXAMPLE_BATCH, shape.heads, EXAMPLE_PAST, shape.head_dim,
                                                generator=generator).to(device, shape.dtype)
    users = list(call.users)
    call.kwargs = {**call.kwargs, "past_attention_mask": placeholders["past_attention_mask"], "past": past}
    outputs, previous = [], call
    for index in range(1 + len(past)):  # (the head's input, *present)
        with graph.inserting_after(previous):
            previous = graph.call_function(operator.getitem, (call, index))
        outputs.append(previous)
    for user in users:
        user.replace_input_with(call, outputs[0])
    output = graph.output_node()
    output.args = ((*output.args[0], *outputs[1:]),)
    # the call's argument checks (export's _guards_fn) still see the model's inputs only
    graph._codegen.pytree_info = graph._codegen.pytree_info._replace(
        in_spec=pytree.tree_structure((signature_args(examples), {})),
        out_spec=pytree.tree_structure(tuple(output.args[0])))
    graph.lint()
    gm.recompile()
    return shape


def stand_in(tensor: Tensor) -> Tensor:
    """A zero-stride tensor of `tensor`'s shape, dtype and device (a Parameter for a Parameter): it traces and
    rewrites as the tensor would, and holds one element."""
    zeros = torch.zeros((), dtype=tensor.dtype, device=tensor.device).expand(tensor.shape)
    return nn.Parameter(zeros, requires_grad=False) if isinstance(tensor, nn.Parameter) else zeros


def stand_in_model(model: nn.Module) -> nn.Module:
    """A copy of the model's module tree with every parameter and buffer a stand-in: what the decode graph is
    captured from, so that keeping it until then keeps no weight alive."""
    copy = structural_copy(model)
    for module in copy.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None:
                    store[name] = stand_in(tensor)
    return copy


def stand_ins(value: Any) -> Any:
    """`value` (what a pass made: tensors in dicts, tuples and dataclasses, or modules) with every tensor a
    stand-in; modules as they are (the side network: small, and replaced by name like every tensor)."""
    if isinstance(value, Tensor):
        return stand_in(value)
    if isinstance(value, dict):
        return {key: stand_ins(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(stand_ins(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: stand_ins(getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})
    return value


@dataclass(frozen=True)
class DecodeRecipe:
    """How a module's decode graph is built at its first use: the pass steps run on a capture of a stand-in
    model, with stand-ins of what the training graph's passes made (so nothing is quantized or searched again),
    and then every tensor and module tied by name to the training graph's. It holds no tensor data, so a
    transform that only trains pays nothing for it in time or memory."""

    model: nn.Module
    steps: tuple[tuple[Any, Any], ...]
    made: dict[Any, Any]
    max_seq_len: int
    skip: tuple[str, ...] = ()

    def build(self, train: fx.GraphModule) -> DecodeGraph:
        # a copy of made: the decode pipeline's own make_once calls must not grow the recipe
        decode = build_decode_graph(self.model, self.steps, dict(self.made), max_seq_len=self.max_seq_len,
                                    skip=self.skip)
        tie_weights(decode.graph_module, train, complete=True)
        return decode

    def then(self, step: tuple[Any, Any], made: dict[Any, Any]) -> DecodeRecipe:
        """The recipe of a module made from this one by one more pass (finalize's fold), `made` its run's."""
        return dataclasses.replace(self, steps=(*self.steps, step), made={**self.made, **stand_ins(made)})


# rotary embeddings that rewrite their inv_freq buffer in place as a call's length crosses a threshold
# (transformers' longrope_frequency_update): the decode graph is captured from a stand-in whose buffers are
# zero-stride views, which cannot be written ("dynamic" rope does the same, and transform refuses it at capture)
IN_PLACE_ROPE_TYPES = ("longrope",)


def rope_type(config: Any) -> str:
    """A Hugging Face config's rotary embedding type ("default" where it names none)."""
    for name in ("rope_parameters", "rope_scaling"):  # transformers 5, then 4
        params = getattr(config, name, None)
        if isinstance(params, dict) and isinstance(params.get("rope_type", params.get("type")), str):
            return params.get("rope_type", params.get("type"))
    return "default"


def kv_cache_unsupported(config: Any) -> str | None:
    """Why a causal LM of this config gets no KV-cached decode graph, or None."""
    kind = rope_type(config)
    if kind in IN_PLACE_ROPE_TYPES:
        return (f"{kind} rotary embeddings rewrite their frequencies in place as the length grows, which a decode graph "
                "captured once cannot follow")
    return None


def decode_recipe(model: nn.Module, steps: Sequence[tuple[Any, Any]], made: dict[Any, Any], *, max_seq_len: int,
                  skip: Sequence[str] = ()) -> DecodeRecipe:
    return DecodeRecipe(stand_in_model(model), tuple(steps), stand_ins(made), max_seq_len, tuple(skip))


def tie_weights(decode: fx.GraphModule, train: fx.GraphModule, *, complete: bool = False) -> None:
    """Point every parameter, buffer and module the decode graph reads at the training graph's of the same name.

    The passes already share them; this keeps them shared after `qm.to(...)`, which replaces buffers, and
    replaces a stand-in model's. Constants torch.export lifted (`lifted_tensor_0`, ...) are each graph's own:
    their names collide. complete: raise naming any parameter or buffer the training graph lacks."""
    train_state = dict(train.named_parameters(remove_duplicate=False)) | dict(train.named_buffers(remove_duplicate=False))
    decode_state = {name for name, _ in decode.named_parameters(remove_duplicate=False)} | {
        name for name, _ in decode.named_buffers(remove_duplicate=False)}
    missing = []
    for node in decode.graph.find_nodes(op="get_attr"):
        if node.target in decode_state and node.target in train_state:
            _set_attr(decode, node.target, train_state[node.target])
        elif node.target in decode_state:
            missing.append(node.target)
    if complete and missing:
        raise QGraphError(f"the decode graph reads tensors the training graph does not hold: {missing[:5]}; the "
                          "plan's passes rewrote the two graphs differently (a qgraph bug: please report it)")
    for node in decode.graph.find_nodes(op="call_module"):  # a pass's module (the side network), not export's
        module = train.get_submodule(node.target)
        if next(module.parameters(), None) is not None:
            _set_attr(decode, node.target, module)


def _set_attr(gm: fx.GraphModule, qualified_name: str, value: Tensor | nn.Module) -> None:
    owner, _, name = qualified_name.rpartition(".")
    setattr(gm.get_submodule(owner) if owner else gm, name, value)


class DecodeSession:
    """One generation through the decode graph: `start(prompt)` then `step(token)`, each returning the
    next-token logits (B, V). Keeps the keys and values of every token so far."""

    def __init__(self, decode: DecodeGraph) -> None:
        self.graph = decode
        self.run = decode.inference_module()  # records no autograd: generate steps in inference mode
        self.past: list[Tensor] = []
        self.past_mask: Tensor | None = None
        self.length = 0  # tokens so far, padding included: positions count them, as the uncached graph's do

    def start(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        batch, device = input_ids.shape[0], input_ids.device
        self.past = self.graph.empty_past(batch, device)
        self.past_mask = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.length = 0
        return self._run(input_ids, attention_mask)

    def step(self, tokens: Tensor) -> Tensor:
        if self.past_mask is None:
            raise QGraphError("DecodeSession.step before start: give it the prompt first")
        return self._run(tokens[:, None], torch.ones_like(tokens[:, None]))

    def _run(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        new = input_ids.shape[1]
        positions = torch.arange(self.length, self.length + new, device=input_ids.device).expand(len(input_ids), -1)
        logits, *self.past = self.run(input_ids, attention_mask, self.past_mask, positions, self.past)
        self.past_mask = torch.cat([self.past_mask, attention_mask], dim=1)
        self.length += new
        return logits[:, -1]
