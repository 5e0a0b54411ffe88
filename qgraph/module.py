"""QGraphModule: the transformed model, called like the original."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F

from qgraph.capture import MAX_BATCH, CaptureInfo
from qgraph.cast import TRAINING_DTYPES
from qgraph.compile import compile_graph_module, compile_mode
from qgraph.decode import DecodeGraph, DecodeRecipe, DecodeSession, tie_weights
from qgraph.errors import QGraphError
from qgraph.generate import generate
from qgraph.graph import get_attr_tensor
from qgraph.inputs import check_call
from qgraph.loss import LowRankHeadDelta, linear_cross_entropy
from qgraph.plans import Plan
from qgraph.report import TransformReport
from qgraph.saved_state import save_pretrained


class QGraphModule(nn.Module):
    """Wraps the rewritten GraphModule of a plain module: `forward` takes what the original module
    took and returns what it returned. Hugging Face models get `HFQGraphModule`."""

    def __init__(self, graph_module: fx.GraphModule, report: TransformReport, plan: Plan, info: CaptureInfo,
                 *, compile: bool | str = False) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.report = report
        self.plan = plan
        self.info = info
        # Not a submodule: graph_module already owns the parameters, and a second registration would put
        # each of them in state_dict twice (under names torch.compile's wrapper changes).
        # dynamic shapes: one compiled graph serves every batch size and sequence length in the captured range
        self.__dict__["_run"] = graph_module
        if mode := compile_mode(compile):
            compiled = compile_graph_module(graph_module, mode)
            self.__dict__["_run"] = compiled.run
            report.compiled = compiled.description
        self.register_state_dict_post_hook(_drop_tied_aliases)
        self.register_load_state_dict_pre_hook(_fill_tied_aliases)

    def tied_aliases(self) -> dict[str, str]:
        """state_dict names of a tensor an earlier name holds (a tied embedding's head) -> that earlier name.
        state_dict() leaves them out and load_state_dict() fills them in, as transformers' save_pretrained does
        for a PreTrainedModel: the Trainer writes any other module's state_dict with safetensors, which refuses
        two names of one tensor (SmolLM2's embed_tokens and lm_head)."""
        first: dict[int, str] = {}
        aliases = {}
        for name, tensor in self.graph_module.state_dict(prefix="graph_module.", keep_vars=True).items():
            if id(tensor) in first:
                aliases[name] = first[id(tensor)]
            else:
                first[id(tensor)] = name
        return aliases

    @property
    def _keys_to_ignore_on_save(self) -> list[str]:
        """What transformers' Trainer reads when a checkpoint lacks keys: the tied names (see tied_aliases)."""
        return list(self.tied_aliases())

    def tie_weights(self) -> None:
        """The Trainer calls this after loading a checkpoint without the tied names: nothing to do, since a tied
        name is the same Parameter as the one loaded."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(*args, **kwargs)

    def train(self, mode: bool = True) -> QGraphModule:
        """Set train/eval mode on every submodule.

        torch.export's unlifted module refuses train(); its graph was captured without dropout, so
        the flag matters only to modules a pass placed in the graph, which read it as usual."""
        for module in self.modules():
            module.training = mode
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> QGraphModule:
        """Devices move (qm.to("cuda")); floating dtypes do not. The graph was captured at transform's dtype and
        its ops' dtypes are fixed in it (a bf16 module's graph asserts bf16; its NF4 statistics and LR-QAT factors
        stay float32 on purpose), so a cast module would fail, or give NaN, at its next call. Checked here, where
        every cast arrives (qm.to(dtype), .half(), .bfloat16(), .float(), .type(), a parent module's .to), by
        applying the cast to an empty tensor of each dtype the module holds."""
        held = sorted({t.dtype for t in (*self.parameters(), *self.buffers()) if t.is_floating_point()}, key=str)
        changed = {dtype: fn(torch.empty(0, dtype=dtype)).dtype for dtype in held}
        changed = {old: new for old, new in changed.items() if new != old}
        if changed:
            raise QGraphError(_cast_refusal(changed, held))
        return super()._apply(fn, recurse)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the trainable tensors and the plan as it ran to `directory`, PEFT-style (atomically);
        `qgraph.from_pretrained(base_model, directory)` rebuilds this module. See qgraph.pretrained."""
        return save_pretrained(self, directory)


def _cast_refusal(changed: dict[torch.dtype, torch.dtype], held: list[torch.dtype]) -> str:
    target = next(iter(changed.values()))
    casts = ", ".join(f"{old} -> {new}" for old, new in changed.items())
    if target in held:
        fix = (f"it already computes in {target} (its {', '.join(map(str, changed))} tensors stay so on purpose): "
               "drop the cast")
    elif target in TRAINING_DTYPES:
        fix = f"transform the model in that dtype instead: qgraph.transform(model, plan, dtype={target})"
    else:
        fix = f"qgraph trains in {', '.join(map(str, TRAINING_DTYPES))}: transform the model with one of them (dtype=)"
    return (f"a transformed module's dtypes are fixed by its graph, and this cast would change them ({casts}); "
            f"{fix}. Devices may change: qm.to(device)")


def _drop_tied_aliases(module: QGraphModule, state_dict: dict[str, Any], prefix: str, _metadata: Any) -> None:
    for alias in module.tied_aliases():
        state_dict.pop(prefix + alias, None)


def _fill_tied_aliases(module: QGraphModule, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    for alias, kept in module.tied_aliases().items():
        if prefix + alias not in state_dict and prefix + kept in state_dict:
            state_dict[prefix + alias] = state_dict[prefix + kept]


class HFQGraphModule(QGraphModule):
    """A transformed Hugging Face model: forward names its arguments as the model's does, so callers
    that read the signature (the HF Trainer keeps only the dataset columns forward accepts) see them."""

    def __init__(self, graph_module: fx.GraphModule, report: TransformReport, plan: Plan, info: CaptureInfo,
                 *, compile: bool | str = False, decode_recipe: DecodeRecipe | None = None) -> None:
        super().__init__(graph_module, report, plan, info, compile=compile)
        # Not submodules either: the decode graph's tensors are graph_module's (qgraph.decode); the recipe
        # builds it on first use, and stays (finalize derives the finalized module's from it)
        self.__dict__["decode_recipe"] = decode_recipe
        self.__dict__["_decode_graph"] = None

    @property
    def kv_cache(self) -> bool:
        """Whether generate decodes through a KV-cached decode graph (built or still to build)."""
        return self.decode_recipe is not None

    @property
    def decode_graph(self) -> DecodeGraph | None:
        """The KV-cached decode graph (qgraph.decode), built on first use; None where transform made none."""
        if self._decode_graph is None and self.decode_recipe is not None:
            self.__dict__["_decode_graph"] = self.decode_recipe.build(self.graph_module)
            self.report.decoding = (f"KV cache: decode graph built at first use in {self._decode_graph.seconds:.1f}s, "
                                    "rewritten by the same passes, sharing the training graph's tensors")
        return self._decode_graph

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **loss_kwargs: Any) -> Any:
        # use_cache=False as Hugging Face callers pass it (qgraph.evaluate.causal_lm_forward, the HF Trainer's
        # evaluation): this graph keeps no cache; cached decoding is generate's
        if loss_kwargs.pop("use_cache", False):
            raise QGraphError("a transformed model's forward keeps no KV cache (use_cache=True); qm.generate decodes "
                              "with its decode graph's cache")
        unexpected = set(loss_kwargs) - {"num_items_in_batch"}
        if unexpected:
            raise TypeError(f"{self.info.model_class} was captured with input_ids, attention_mask and labels; "
                            f"got unexpected arguments {sorted(unexpected)}")
        self.check_inputs(input_ids, attention_mask, labels)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        if labels is not None and self.info.is_causal_lm:
            labels = labels.long()  # int32 token ids too, as the mask: the loss indexes with int64
        output = self._run(input_ids=input_ids, attention_mask=attention_mask, **self.info.constant_kwargs)
        if self.info.lm_head is not None:
            return self._apply_head(output, labels, **loss_kwargs)
        if labels is not None:
            output.loss = self._loss(output.logits, labels, **loss_kwargs)
        return output

    def _apply_head(self, output: Any, labels: torch.Tensor | None, **loss_kwargs: Any) -> Any:
        """The graph returned the head's input (chunk_lm_loss): the loss is taken a chunk at a time.

        A training step (labels given, train mode, autograd on) returns `logits=None`: materialising
        them is what the chunked loss avoids. Otherwise the logits are computed as the head would have."""
        hidden = output.logits
        if labels is not None:
            output.loss = self.head_loss(hidden, labels, **loss_kwargs)
        training_step = labels is not None and self.training and torch.is_grad_enabled()
        output.logits = None if training_step else self._head_logits(hidden)
        return output

    def head_loss(self, hidden: torch.Tensor, labels: torch.Tensor, **loss_kwargs: Any) -> torch.Tensor:
        """The causal-LM loss of the head that chunk_lm_loss moved out of the graph (with QST's low-rank delta
        where there is one), taken on `hidden`, the head's input, a chunk at a time."""
        weight, bias = self._head_parameters()
        delta = self._head_delta()
        return linear_cross_entropy(hidden, weight, bias, labels, chunk_tokens=self.info.lm_head.chunk_tokens,
                                    delta=None if delta is None else (delta.down, delta.up), **loss_kwargs)

    def _head_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        head = self.info.lm_head
        bias = get_attr_tensor(self.graph_module, head.bias) if head.bias else None
        return get_attr_tensor(self.graph_module, head.weight), bias

    def _head_delta(self) -> LowRankHeadDelta | None:
        """The head's trainable low-rank delta (QST's head_rank), moved out of the graph with it."""
        path = self.info.lm_head.delta
        return self.graph_module.get_submodule(path) if path else None

    def _head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the head the chunk_lm_loss pass moved out of the graph computes."""
        logits = F.linear(hidden, *self._head_parameters())
        delta = self._head_delta()
        return logits if delta is None else logits + delta(hidden)

    def next_token_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, vocab): the logits at each row's last position, what a decoding step reads.

        When chunk_lm_loss moved the head out of the graph, the head runs on that position alone
        rather than on every position (a fifth of SmolLM2's compute per token is its head)."""
        self.require_causal_lm("next-token logits need")
        self.check_inputs(input_ids, attention_mask)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        output = self._run(input_ids=input_ids, attention_mask=attention_mask, **self.info.constant_kwargs)
        if self.info.lm_head is None:
            return output.logits[:, -1]
        head_input = output.logits  # the graph returns the hidden state the head reads
        return self._head_logits(head_input[:, -1])

    def require_causal_lm(self, what: str) -> None:
        """Raise, naming `what` needs it, unless this is a causal LM (decoding reads next-token logits)."""
        if not self.info.is_causal_lm:
            raise QGraphError(f"{what} a causal language model; this one is a {self.info.model_class} "
                              "(call it for its logits instead)")

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor, **loss_kwargs: Any) -> torch.Tensor:
        """The original model's own loss function, called the way its forward calls it."""
        if self.info.model_class.endswith("ForSequenceClassification"):
            return self.info.loss_function(labels=labels, pooled_logits=logits, config=self.info.config)
        return self.info.loss_function(logits=logits, labels=labels, vocab_size=self.info.config.vocab_size,
                                       **loss_kwargs)

    def check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     labels: torch.Tensor | None = None) -> None:
        """Bad arguments as errors that name them, not as errors from inside the graph (qgraph.inputs): what
        forward, next_token_logits and generate check before they run."""
        config = self.info.config
        check_call(input_ids, attention_mask, labels, vocab_size=getattr(config, "vocab_size", None),
                   max_batch=MAX_BATCH, max_seq_len=self.info.max_seq_len, per_token_labels=self.info.is_causal_lm,
                   config=config)

    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Decode with this module in the loop (greedy, or sampling; KV-cached unless use_cache=False): see
        `qgraph.generate.generate`."""
        return generate(self, input_ids, **kwargs)

    def tied_decode_graph(self) -> DecodeGraph | None:
        """The decode graph reading graph_module's tensors as they are now (after a `qm.to(...)` too)."""
        if self.decode_graph is not None:
            tie_weights(self.decode_graph.graph_module, self.graph_module)
        return self.decode_graph

    def decode_session(self) -> DecodeSession | None:
        """A KV-cached generation through the decode graph, or None where transform made none (the report's
        `decoding` line says why); generate then runs the whole sequence per token."""
        decode = self.tied_decode_graph()
        return DecodeSession(decode) if decode is not None else None


def wrap_graph_module(graph_module: fx.GraphModule, report: TransformReport, plan: Plan, info: CaptureInfo, *,
                      compile: bool | str = False, decode_recipe: DecodeRecipe | None = None) -> QGraphModule:
    """The module transform and finalize return: HFQGraphModule for a Hugging Face model."""
    if info.kind != "hf":
        return QGraphModule(graph_module, report, plan, info, compile=compile)
    return HFQGraphModule(graph_module, report, plan, info, compile=compile, decode_recipe=decode_recipe)
