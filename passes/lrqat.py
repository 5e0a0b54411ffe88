"""lrqat: every selected linear becomes `qgraph::lrqat_linear` (LR-QAT, Bondarenko et al. 2024).

Per site the pretrained weight W0 is replaced by Phi0 = phi(W0 / s0) (a frozen buffer) and three
parameters: A (out x r, zeros), B (r x in, Kaiming-uniform) and the scale s (starting at s0). With
A = 0 the layer is exactly round-to-nearest (RTN) of W0 on the s0 grid (see qgraph.quant.downcast for
the one caveat of the "fixed" and "bf16" formats), so training starts at RTN post-training quantization.

scale_dtype="float16" (or "bfloat16") keeps the scales a narrower format can store, for targets that store
them so (GGUF's Q4_0 keeps fp16 scales): s0 is rounded to it before Phi0 is formed (step 0 is then exactly
RTN on the rounded grid), and `qgraph::round_scale` between s and lrqat_linear feeds the forward the rounded
s with a straight-through gradient, while the fp32 parameter keeps its small updates. fold_lrqat folds the
rounded scale, so the deployed scales are exact in that format and the deployed forward is the trained one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx, nn

from passes.quantize_nf4 import default_selection_note, selected_sites
from qgraph.errors import PassError
from qgraph.graph import LinearSite, as_patterns
from qgraph.inputs import is_int
from qgraph.ops.lrqat import phi0_from_weight
from qgraph.ops.round_scale import round_scale_reference
from qgraph.pipeline import PassContext, PassResult, PassSpec, options_dict
from qgraph.quant.downcast import PHI_FORMATS
from qgraph.quant.uniform import MAX_BITS, MIN_BITS, SCALE_INIT_METHODS, init_scale, resolve_group_size
from qgraph.report import REWRITTEN, SKIPPED, PassReport, SiteRecord
from qgraph.rewrite import other_readers, replace_site, site_weight

PASS_NAME = "lrqat"
# Attribute names registered on each rewritten linear's module (prefixed with the weight's own
# attribute name when that is not "weight", so two sites of one module never collide).
PHI0, LORA_A, LORA_B, SCALE = "lrqat_phi0", "lrqat_a", "lrqat_b", "lrqat_scale"
MAX_NAMES_PER_SHAPE = 3  # layers named per in_features in an error / note before "and N more"
# scale_dtype values: float32 trains and folds the scale as it is; the others round it (qgraph::round_scale)
SCALE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class LRQATOptions:
    bits: int = 4
    # -1: one scale per output channel; g > 0: one scale per g consecutive input columns
    group_size: int = -1
    rank: int = 32
    alpha: float = 1.0
    phi_format: str = "fixed"  # storage of Phi0: fixed (Q(b).(8-b) int8), int-packed, bf16, fp32
    init: str = "lp"  # range init of s0: lp (grid search on ||W - Q(W)||_p), mse, minmax
    p: float = 4.0
    n_candidates: int = 100
    train_ab: bool = True
    train_scale: bool = True
    # use per-channel scales (and list them in the report) where group_size does not divide in_features
    per_channel_fallback: bool = False
    # module-path globs; None selects every linear inside a decoder block (not embeddings or lm_head)
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    # B's Kaiming-uniform init draws from this seed, not the global RNG (which torch seeds at random
    # in every process): the same plan gives the same module
    seed: int = 0
    # the format the forward (and the folded model) sees the scales in: "float16" keeps them fp16-exact, so
    # that a GGUF file (fp16 scales) equals the trained model; the trained parameter itself stays float32
    scale_dtype: str = "float32"

    def __post_init__(self) -> None:
        if not is_int(self.bits) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {self.bits!r}")
        if not is_int(self.group_size) or not (self.group_size == -1 or self.group_size > 0):
            raise ValueError(f"group_size must be -1 (one scale per output channel) or a positive number of "
                             f"input columns per scale (128 is typical), got {self.group_size!r}")
        _check_int("rank", self.rank, 1, "a positive integer (32 is the paper's default)")
        _check_number("alpha", self.alpha, "a positive number (the low-rank update is scaled by alpha / rank)")
        if self.phi_format not in PHI_FORMATS:
            raise ValueError(f"phi_format must be one of {', '.join(PHI_FORMATS)}, got {self.phi_format!r}")
        if self.init not in SCALE_INIT_METHODS:
            raise ValueError(f"init must be one of {', '.join(SCALE_INIT_METHODS)}, got {self.init!r}")
        _check_number("p", self.p, "a positive number (the norm of the lp range search; 4 in the paper)")
        _check_int("n_candidates", self.n_candidates, 1, "a positive integer (scales tried per group)")
        _check_int("seed", self.seed, 0, "a non-negative integer")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)} (float16 keeps the scales "
                             f"fp16-exact, as GGUF stores them), got {self.scale_dtype!r}")
        for name in ("train_ab", "train_scale", "per_channel_fallback"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        object.__setattr__(self, "include", as_patterns(self.include))
        object.__setattr__(self, "exclude", as_patterns(self.exclude) or ())

    @property
    def lora_scale(self) -> float:
        return self.alpha / self.rank

    @property
    def rounds_scale(self) -> bool:
        return self.scale_dtype != "float32"



def _check_int(name: str, value: object, minimum: int, what: str) -> None:
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be {what}, got {value!r}")


def _check_number(name: str, value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be {what}, got {value!r}")


def lrqat(gm: fx.GraphModule, context: PassContext, options: LRQATOptions) -> PassResult:
    report = PassReport(PASS_NAME, options_dict(options))
    sites = selected_sites(gm, options.include, options.exclude)
    report.matched = len(sites)
    report.notes.extend(default_selection_note(gm, options.include))
    # Decide every site before touching any: a group size that cannot apply fails with the model intact.
    plans: list[tuple[LinearSite, int | None, str]] = []  # (site, group size or None if skipped, why)
    fallbacks: list[LinearSite] = []
    for site in sites:
        tied = [n.name for n in other_readers(gm, site)]
        if tied:
            plans.append((site, None, f"weight {site.weight_name} is also read by {', '.join(tied)} (tied); "
                                      "quantizing it would change those too: exclude this site or untie the weights"))
        elif options.group_size > 0 and site.in_features % options.group_size:
            fallbacks.append(site)
            plans.append((site, -1, ""))
        else:
            plans.append((site, options.group_size, ""))
    if fallbacks and not options.per_channel_fallback:
        raise PassError(_group_size_error(options.group_size, fallbacks))
    if fallbacks:
        report.notes.append(
            f"group_size={options.group_size} does not divide the in_features of {len(fallbacks)} layer(s); "
            f"they use one scale per output channel (per_channel_fallback=True): {_name_layers(fallbacks)}")

    trainable = context.trainable.setdefault(PASS_NAME, [])
    fallback_set = set(fallbacks)
    generator = torch.Generator().manual_seed(options.seed)  # one stream for the pass: B differs per layer
    for site, group_size, reason in plans:
        if group_size is None:
            report.records.append(SiteRecord(site.path, SKIPPED, reason=reason))
            continue
        tensors = context.make_once((PASS_NAME, site.weight_name),
                                    lambda: _tensors(site_weight(gm, site, context.sources), site, group_size, options, generator))
        record, names = _rewrite(gm, site, tensors, group_size, options, fallback=site in fallback_set)
        report.records.append(record)
        trainable.extend(names)
    return PassResult(gm, modified=bool(report.rewritten), report=report)


def _group_size_error(group_size: int, sites: list[LinearSite]) -> str:
    widths = sorted({s.in_features for s in sites})
    hints = []
    for width in widths:
        try:
            resolve_group_size(width, group_size)
        except ValueError as exc:
            hints.append(str(exc))
    return (
        f"lrqat: group_size={group_size} does not divide the in_features of {len(sites)} layer(s): "
        f"{_name_layers(sites)}. Nothing was changed. Fix: " + "; ".join(hints)
        + "; or pass per_channel_fallback=True to give those layers one scale per output channel "
        "(listed in the report), or exclude them"
    )


def _name_layers(sites: list[LinearSite]) -> str:
    by_width: dict[int, list[str]] = {}
    for site in sites:
        by_width.setdefault(site.in_features, []).append(site.path or site.weight_name)
    parts = []
    for width, paths in sorted(by_width.items()):
        shown = ", ".join(paths[:MAX_NAMES_PER_SHAPE])
        more = f" and {len(paths) - MAX_NAMES_PER_SHAPE} more" if len(paths) > MAX_NAMES_PER_SHAPE else ""
        parts.append(f"in_features={width}: {shown}{more}")
    return "; ".join(parts)


def attribute_names(site: LinearSite) -> dict[str, str]:
    """The names Phi0, A, B and s get on the site's module."""
    weight_attr = site.weight_name.rpartition(".")[2]
    prefix = "" if weight_attr == "weight" else f"{weight_attr}_"
    return {key: prefix + key for key in (PHI0, LORA_A, LORA_B, SCALE)}


def _tensors(weight: torch.Tensor, site: LinearSite, group_size: int, options: LRQATOptions,
             generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Phi0, A, B and s of one linear, under their attribute names."""
    bits, rank = options.bits, options.rank
    scale0 = init_scale(weight, bits, group_size, options.init, options.p, options.n_candidates)
    if options.rounds_scale:
        # Phi0 on the rounded grid: the forward (which sees round(s)) then starts at RTN of that grid
        scale0 = _rounded_initial_scale(scale0, options.scale_dtype, site)
    phi0 = phi0_from_weight(weight, scale0, bits, group_size, options.phi_format)
    # A, B and s in the scale's dtype (at least float32): small, and trained in full precision.
    dtype, device = scale0.dtype, weight.device
    lora_a = nn.Parameter(torch.zeros(site.out_features, rank, dtype=dtype, device=device))
    lora_b = torch.empty(rank, site.in_features, dtype=dtype)  # drawn on the CPU, where the generator is
    nn.init.kaiming_uniform_(lora_b, a=math.sqrt(5), generator=generator)  # as nn.Linear initialises its weight
    lora_b = nn.Parameter(lora_b.to(device))
    scale = nn.Parameter(scale0.clone())
    names = attribute_names(site)
    return {names[PHI0]: phi0, names[LORA_A]: lora_a, names[LORA_B]: lora_b, names[SCALE]: scale}


def _rewrite(gm: fx.GraphModule, site: LinearSite, tensors: dict[str, torch.Tensor], group_size: int,
             options: LRQATOptions, *, fallback: bool) -> tuple[SiteRecord, list[str]]:
    weight = site_weight(gm, site)
    bits, rank = options.bits, options.rank
    names = attribute_names(site)

    rounded: list[fx.Node] = []

    def args(x: fx.Node, attrs: dict[str, fx.Node], bias: fx.Node | None) -> tuple:
        scale_arg = attrs[names[SCALE]]
        if options.rounds_scale:  # replace_site calls this where the new nodes go, before the old linear
            scale_arg = gm.graph.call_function(torch.ops.qgraph.round_scale.default, (scale_arg, options.scale_dtype))
            rounded.append(scale_arg)
        return (x, attrs[names[PHI0]], attrs[names[LORA_A]], attrs[names[LORA_B]], scale_arg, bias,
                bits, group_size, options.lora_scale, options.phi_format)

    bytes_before = weight.numel() * weight.element_size()
    new = replace_site(gm, site, torch.ops.qgraph.lrqat_linear.default, tensors, args)
    for node in rounded:  # in the layer's module (and so in its decoder block and checkpoint region)
        node.meta.update({k: v for k, v in new.meta.items() if k in ("nn_module_stack", "stack_trace")})
    owner = site.weight_name.rpartition(".")[0]
    qualified = {key: f"{owner}.{name}" if owner else name for key, name in names.items()}
    trainable = ([qualified[LORA_A], qualified[LORA_B]] if options.train_ab else []) + (
        [qualified[SCALE]] if options.train_scale else [])
    bytes_after = sum(t.numel() * t.element_size() for t in tensors.values())
    grouping = f"g{group_size}" if group_size > 0 else "per-channel"
    if fallback:
        grouping += f" (fallback: group_size={options.group_size} does not divide {site.in_features})"
    detail = f"{site.out_features}x{site.in_features} w{bits} {grouping} {options.phi_format} r{rank}"
    if options.rounds_scale:
        detail += f" scales {options.scale_dtype}"
    reason = (f"per-channel fallback: group_size={options.group_size} does not divide "
              f"in_features={site.in_features}") if fallback else ""
    record = SiteRecord(site.path, REWRITTEN, reason=reason, params=weight.numel(), bytes_before=bytes_before,
                        bytes_after=bytes_after, detail=detail)
    return record, trainable


def _rounded_initial_scale(scale0: torch.Tensor, scale_dtype: str, site: LinearSite) -> torch.Tensor:
    rounded = round_scale_reference(scale0, scale_dtype)
    lost = ~torch.isfinite(rounded) | ((rounded == 0) & (scale0 != 0))
    if lost.any():
        raise PassError(
            f"lrqat: scale_dtype={scale_dtype!r} cannot hold the initial scales of {site.path or site.weight_name} "
            f"(largest {scale0.abs().max().item():g}, smallest nonzero "
            f"{scale0[scale0 != 0].abs().min().item():g}): they round to inf or 0. Use scale_dtype='float32' "
            "or exclude this layer")
    return rounded


PASS = PassSpec(PASS_NAME, lrqat, LRQATOptions,
                "linears -> qgraph::lrqat_linear (LR-QAT: low-rank A, B and scale trained inside the quantizer)")
