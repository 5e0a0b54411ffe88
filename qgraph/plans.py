"""Named, serialisable plans: ordered lists of pass configs, and how user options override them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qgraph.errors import PlanError, unknown_name_message


@dataclass(frozen=True)
class PassConfig:
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise PlanError(f"a pass is named by a string (e.g. PassConfig('lrqat')), got {self.name!r}")
        if not isinstance(self.options, Mapping):
            raise PlanError(f"pass {self.name!r}: options are a dict of option names to values, got {self.options!r}")


@dataclass(frozen=True)
class Plan:
    name: str
    description: str
    passes: tuple[PassConfig, ...]

    def __post_init__(self) -> None:
        # a list is taken as the tuple it means; strings and dicts are not passes (each field is read later)
        if isinstance(self.passes, list):
            object.__setattr__(self, "passes", tuple(self.passes))
        if not isinstance(self.passes, tuple) or not all(isinstance(p, PassConfig) for p in self.passes):
            raise PlanError(f"plan {self.name!r}: passes are a tuple of PassConfig (e.g. (PassConfig('lrqat', "
                            f"{{'bits': 4}}),)), got {self.passes!r}")

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "description": self.description,
                           "passes": [{"name": p.name, "options": p.options} for p in self.passes]}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """The plan `to_json` wrote: {"name": ..., "passes": [{"name": ..., "options": {...}}, ...]}."""
        try:
            data = json.loads(text)
            passes = tuple(PassConfig(p["name"], dict(p.get("options", {}))) for p in data["passes"])
            return cls(data["name"], data.get("description", ""), passes)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise PlanError(f"not a plan's JSON ({type(exc).__name__}: {exc}): a plan is an object with a \"name\" "
                            "and a \"passes\" list of {\"name\": ..., \"options\": {...}} (as Plan.to_json writes "
                            "it)") from exc


CHECKPOINT_PASS = "insert_checkpoints"
# options a plain `name=value` override does not reach: insert_checkpoints' globs name decoder blocks, not the
# linear layers the other passes' include/exclude name (lrqat-w4 with include=['*.mlp.*'] would lose its
# checkpoints); `checkpoint={...}` or `insert_checkpoints.include=...` sets them
NAMED_ONLY = frozenset({("insert_checkpoints", "include"), ("insert_checkpoints", "exclude")})
# the passes that find linear layers or decoder blocks in the graph, and so must run before the blocks are regions
BEFORE_CHECKPOINTS = ("quantize_nf4", "lrqat", "fake_quant_activations", "attach_side_taps", "fold_lrqat")
# Every plan that trains through the decoder blocks recomputes them in backward (peqa-w4 too: its
# scales' gradients need each linear's input, so activations dominate its memory as they do LR-QAT's).
# rtn-w4 and nf4 train nothing: there is nothing to recompute. Each region keeps what is dearest to
# recompute for its size (selective checkpointing): the attention kernel's output and the outputs of the
# two linears that feed the residual stream. On SmolLM2-135M that is 0.2 GiB more at the peak for a
# recompute without attention and without 2 of the 7 matmuls (tools/bench_lrqat.py).
CHECKPOINT_BLOCKS = PassConfig(CHECKPOINT_PASS, {"save": ["attention", "residual_linears"]})
# Every plan that trains takes its loss a chunk of tokens at a time: once the blocks are checkpointed,
# full-vocabulary logits and their gradient are most of what is left of the training peak.
CHUNKED_LOSS = PassConfig("chunk_lm_loss")
TRAINING_TAIL = (CHECKPOINT_BLOCKS, CHUNKED_LOSS)

PLANS: dict[str, Plan] = {
    plan.name: plan
    for plan in (
        Plan("nf4", "every decoder linear to bitsandbytes NF4 (blocksize 64, double quantization); "
             "frozen, for inference or as a backbone", (PassConfig("quantize_nf4"),)),
        Plan("lrqat-w4", "LR-QAT, 4-bit weights, one scale per output channel: decoder linears -> lrqat_linear "
             "(Phi0 in Q4.4 fixed point, rank 32, alpha 1, lp range init); trains A, B and the scales",
             (PassConfig("lrqat", {"bits": 4}), *TRAINING_TAIL)),
        Plan("lrqat-w4g128", "LR-QAT, 4-bit weights, one scale per 128 input columns (Q4.4 Phi0, rank 32); "
             "trains A, B and the scales",
             (PassConfig("lrqat", {"bits": 4, "group_size": 128}), *TRAINING_TAIL)),
        Plan("lrqat-w3", "LR-QAT, 3-bit weights, one scale per output channel (Phi0 in Q3.5 fixed point, "
             "rank 32); trains A, B and the scales", (PassConfig("lrqat", {"bits": 3}), *TRAINING_TAIL)),
        Plan("lrqat-w3g128", "LR-QAT, 3-bit weights, one scale per 128 input columns (Q3.5 Phi0, rank 32); "
             "trains A, B and the scales",
             (PassConfig("lrqat", {"bits": 3, "group_size": 128}), *TRAINING_TAIL)),
        # 8da4w, the pattern ExecuTorch's XNNPACK runs as a 4-bit GEMM: int4 weights one scale per 32 input
        # columns (torchao's QAT recipe for int4 weights, IntxFakeQuantizeConfig(torch.int4, group_size=32); its
        # older Int8DynActInt4WeightQATQuantizer's 256, like 128, does not divide SmolLM2's width 576), and int8
        # per-token activations
        Plan("lrqat-w4a8", "LR-QAT, 4-bit weights one scale per 32 input columns (Q4.4 Phi0, rank 32), and each "
             "decoder linear's input fake-quantized to int8 per token (asymmetric, the runtime's exact math): "
             "trains A, B and bf16-exact scales (XNNPACK stores them in bf16) for ExecuTorch's 8da4w (.pte)",
             # fp32 scales rounded to bf16 at export moved SmolLM2's logits by 7.2 of a 42.7 range (top-1 81%):
             # trained bf16-exact, the .pte holds the trained scales
             (PassConfig("lrqat", {"bits": 4, "group_size": 32, "scale_dtype": "bfloat16"}),
              PassConfig("fake_quant_activations"),
              *TRAINING_TAIL)),
        Plan("rtn-w4", "round-to-nearest 4-bit PTQ baseline, per output channel, lp range init: the lrqat_linear "
             "of lrqat-w4 with nothing trained (A = 0, rank 1) and the codes stored int-packed, so exactly RTN",
             (PassConfig("lrqat", {"bits": 4, "rank": 1, "phi_format": "int-packed",
                                   "train_ab": False, "train_scale": False}),)),
        Plan("peqa-w4", "PEQA-style baseline: 4-bit RTN integer weights frozen (int-packed), only the "
             "per-channel scales trained (A = 0 and untrained, rank 1)",
             (PassConfig("lrqat", {"bits": 4, "rank": 1, "phi_format": "int-packed",
                                   "train_ab": False, "train_scale": True}), *TRAINING_TAIL)),
        Plan("qst-nf4", "QST: NF4 backbone (frozen, no gradient enters it) + a side network 1/16 as wide reading "
             "the embedding and every layer's output, mixed into the head's input (starts as the backbone); "
             "trains the side network only",
             (PassConfig("quantize_nf4"), PassConfig("attach_side_taps"), CHUNKED_LOSS)),
    )
}


def plans() -> list[str]:
    """The names of the built-in plans."""
    return sorted(PLANS)


def get_plan(plan: str | Plan) -> Plan:
    if isinstance(plan, Plan):
        return plan
    if plan not in PLANS:
        raise PlanError(unknown_name_message("plan", plan, PLANS))
    return PLANS[plan]


def steps_train(steps: list[tuple[Any, Any]]) -> bool:
    """Whether resolved steps train anything: LR-QAT's options say what trains (train_ab, train_scale); a pass
    that always trains (attach_side_taps) says `trains`."""
    return any(bool(getattr(options, flag, False)) for _, options in steps
               for flag in ("train_ab", "train_scale", "trains"))


def resolve_steps(plan: Plan, overrides: dict[str, Any]) -> list[tuple[Any, Any]]:
    """(PassSpec, options instance) per pass, with `overrides` applied.

    An override `name=value` applies to every pass of the plan that has an option `name` (but NAMED_ONLY's);
    `pass_name.option=value` (as a dict key) to that pass alone. Every unknown name is an error that
    lists the valid ones, raised before anything is captured or changed.
    """
    from passes import get_pass

    if not plan.passes:
        raise PlanError(f"plan {plan.name!r} has no passes: it would return the model as it is; list the passes "
                        "to run")
    specs = [get_pass(config.name) for config in plan.passes]
    check_pass_order([spec.name for spec in specs], plan.name)
    per_pass: list[dict[str, Any]] = [dict(config.options) for config in plan.passes]
    valid = sorted({n for s in specs for n in s.option_names()} | {f"{s.name}.{n}" for s in specs for n in s.option_names()})
    for key, value in overrides.items():
        pass_name, _, option = key.rpartition(".")
        targets = [i for i, spec in enumerate(specs) if option in spec.option_names() and (
            spec.name == pass_name if pass_name else (spec.name, option) not in NAMED_ONLY)]
        if not targets:
            raise PlanError(unknown_name_message("option", key, valid) + f" (plan {plan.name!r})")
        for i in targets:
            per_pass[i][option] = value
    steps = []
    for spec, options in zip(specs, per_pass, strict=True):
        try:
            steps.append((spec, spec.options_type(**options)))
        except (TypeError, ValueError) as exc:
            raise PlanError(f"pass {spec.name!r}: {exc}") from exc
    return steps


def check_pass_order(names: list[str], plan_name: str) -> None:
    """insert_checkpoints moves each decoder block into a region of its own: a pass after it that looks for
    linear layers or blocks in the graph finds none."""
    if CHECKPOINT_PASS not in names:
        return
    after = [name for name in names[names.index(CHECKPOINT_PASS) + 1:] if name in BEFORE_CHECKPOINTS]
    if after:
        raise PlanError(f"plan {plan_name!r} runs {', '.join(after)} after {CHECKPOINT_PASS}, whose regions hide the "
                        f"decoder blocks from it; put {CHECKPOINT_PASS} after every pass that rewrites the blocks")


CHECKPOINT_CHOICES = ('"blocks" (a region per decoder block)', '"none" (no checkpoints)',
                      '{"every": k} (a region per k blocks; other insert_checkpoints options allowed)',
                      "None (the plan's own choice)")


def with_checkpoint(plan: Plan, checkpoint: str | dict | None) -> Plan:
    """`plan` as `transform(..., checkpoint=...)` asks: None keeps it; "none" drops insert_checkpoints;
    "blocks" or a dict of its options sets it (on top of the plan's own options, added last if absent)."""
    if checkpoint is None:
        return plan
    if checkpoint == "none":
        return Plan(plan.name, plan.description, tuple(p for p in plan.passes if p.name != CHECKPOINT_PASS))
    if checkpoint == "blocks":
        overrides: dict[str, Any] = {"every": 1}
    elif isinstance(checkpoint, dict):
        from passes import get_pass

        valid = get_pass(CHECKPOINT_PASS).option_names()
        for key in checkpoint:
            if key not in valid:
                raise PlanError(f"checkpoint={checkpoint!r}: " + unknown_name_message("option", str(key), valid)
                                + f" of {CHECKPOINT_PASS}")
        overrides = dict(checkpoint)
    else:
        hint = unknown_name_message("checkpoint value", checkpoint, ["blocks", "none"]) + "; " if isinstance(
            checkpoint, str) else ""
        raise PlanError(f"checkpoint={checkpoint!r} is not valid: {hint}use one of " + ", ".join(CHECKPOINT_CHOICES))
    existing = [p for p in plan.passes if p.name == CHECKPOINT_PASS]
    base = existing[0].options if existing else _checkpoint_defaults(plan)
    config = PassConfig(CHECKPOINT_PASS, {**base, **overrides})
    passes = tuple(config if p.name == CHECKPOINT_PASS else p for p in plan.passes)
    return Plan(plan.name, plan.description, passes if existing else (*passes, config))


def _checkpoint_defaults(plan: Plan) -> dict[str, Any]:
    """Where a plan's checkpoint regions go when the user asks for some: in a QST plan only the side
    network trains (the backbone keeps no activations to recompute), so its blocks are the regions."""
    if any(p.name == "attach_side_taps" for p in plan.passes):
        from qgraph.side_network import SIDE_MODULE

        return {"target": "modules", "include": (f"{SIDE_MODULE}.blocks.*",)}
    return {}
