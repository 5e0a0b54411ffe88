"""quantize_nf4: every selected linear becomes `qgraph::nf4_linear` over bitsandbytes NF4 storage."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from qgraph.graph import LinearSite, as_patterns, block_sites, decoder_blocks, linear_sites, select_sites
from qgraph.inputs import is_int
from qgraph.ops.nf4 import quantize_nf4 as quantize_weight
from qgraph.pipeline import PassContext, PassResult, PassSpec, options_dict
from qgraph.report import REWRITTEN, SKIPPED, PassReport, SiteRecord
from qgraph.rewrite import other_readers, replace_site, site_bias, site_weight

BNB_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(frozen=True)
class NF4Options:
    blocksize: int = 64
    double_quant: bool = True
    # module-path globs; None selects every linear inside a decoder block (not embeddings or lm_head)
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant must be True or False, got {self.double_quant!r}")
        # 64.0 == 64 and True == 1: only ints, which bitsandbytes' op schema takes
        if not is_int(self.blocksize) or self.blocksize not in BNB_BLOCKSIZES:
            raise ValueError(f"blocksize={self.blocksize!r} is not one bitsandbytes supports; use one of "
                             f"{BNB_BLOCKSIZES}, an int")
        object.__setattr__(self, "include", as_patterns(self.include))
        object.__setattr__(self, "exclude", as_patterns(self.exclude) or ())



def selected_sites(gm: fx.GraphModule, include: tuple[str, ...] | None, exclude: tuple[str, ...]) -> list[LinearSite]:
    """The default is every decoder-block linear, or every linear of a module without decoder blocks (a plain
    MLP); explicit globs select among all linear sites."""
    candidates = default_sites(gm) if include is None else select_sites(linear_sites(gm), include)
    return select_sites(candidates, ("*",), exclude)


def default_sites(gm: fx.GraphModule) -> list[LinearSite]:
    return block_sites(gm) if decoder_blocks(gm) else linear_sites(gm)


def default_selection_note(gm: fx.GraphModule, include: tuple[str, ...] | None) -> list[str]:
    """The report's word on a default selection that is not the decoder blocks' linears."""
    if include is None and not decoder_blocks(gm):
        return ["no decoder blocks found (a module that is not a transformer stack): every linear site selected"]
    return []


def quantize_nf4(gm: fx.GraphModule, context: PassContext, options: NF4Options) -> PassResult:
    report = PassReport("quantize_nf4", options_dict(options))
    sites = selected_sites(gm, options.include, options.exclude)
    report.matched = len(sites)
    report.notes.extend(default_selection_note(gm, options.include))
    for site in sites:
        tied = [n.name for n in other_readers(gm, site)]
        if tied:
            report.records.append(SiteRecord(site.path, SKIPPED, reason=(
                f"weight {site.weight_name} is also read by {', '.join(tied)} (tied); quantizing it would "
                "change those too: exclude this site or untie the weights")))
            continue
        report.records.append(_rewrite(gm, site, context, options))
    return PassResult(gm, modified=bool(report.rewritten), report=report)


def _rewrite(gm: fx.GraphModule, site: LinearSite, context: PassContext, options: NF4Options) -> SiteRecord:
    weight = site_weight(gm, site, context.sources)
    bias = site_bias(gm, site)
    q = context.make_once((PASS.name, site.weight_name),
                          lambda: quantize_weight(weight, options.blocksize, options.double_quant))
    tensors = {"nf4_packed": q.packed, "nf4_absmax": q.absmax, "nf4_code": q.code}
    if q.nested_absmax is not None:
        tensors |= {"nf4_nested_absmax": q.nested_absmax, "nf4_nested_code": q.nested_code, "nf4_offset": q.offset}

    def args(x: fx.Node, attrs: dict[str, fx.Node], bias_node: fx.Node | None) -> tuple:
        return (x, attrs["nf4_packed"], attrs["nf4_absmax"], attrs["nf4_code"], attrs.get("nf4_nested_absmax"),
                attrs.get("nf4_nested_code"), attrs.get("nf4_offset"), bias_node,
                site.out_features, site.in_features, q.blocksize, q.nested_blocksize)

    bytes_before = weight.numel() * weight.element_size()
    replace_site(gm, site, torch.ops.qgraph.nf4_linear.default, tensors, args)
    return SiteRecord(site.path, REWRITTEN, params=weight.numel(), bytes_before=bytes_before,
                      bytes_after=q.nbytes(), detail=f"{site.out_features}x{site.in_features} {site.kind}")


PASS = PassSpec("quantize_nf4", quantize_nf4, NF4Options,
                "linears -> qgraph::nf4_linear (bitsandbytes NF4, frozen)")
