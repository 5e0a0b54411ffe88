"""The pt2 target: a standalone `torch.export` program (torch.export.save) of standard aten ops.

Each qgraph op is decomposed into aten before export (qgraph.export.aten): the file holds the packed
4-bit weights and decodes them in the program, and `torch.export.load(path).module()` runs it in any
process with torch, qgraph or not:

    program = torch.export.load("model.pt2").module()
    logits = program(input_ids=ids, attention_mask=mask)

`decode=True` writes the KV-cached decode graph instead (qgraph.decode), so that the file generates one token
per step as `qm.generate` does:

    logits, *present = program(input_ids, attention_mask, past_attention_mask, position_ids, past)

(past/present: [k_0, v_0, k_1, v_1, ...], each (batch, kv_heads, tokens, head_dim); a prompt's past is one
zero slot that past_attention_mask hides; runners/_decoding.py is the loop.)

`keep_ops=True` saves the finalized graph as it is, fused qgraph ops included. Such a file deserializes
only where qgraph has registered its ops, so `import qgraph` must come before `torch.export.load`; the
check's runner does that (and only that) for it. It is for moving a model between qgraph processes, not
for deployment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from qgraph.errors import ExportError
from qgraph.decode import dynamic_shapes as decode_dynamic_shapes
from qgraph.decode import signature_args
from qgraph.export.aten import aten_program, decompose_qgraph_ops, op_mapping, qgraph_op_counts
from qgraph.export.program import DECODE_NOTE, LogitsProgram, decode_unsupported, dynamic_shapes
from qgraph.export.target import Artifact, ExportTarget
from qgraph.module import QGraphModule

if TYPE_CHECKING:
    from qgraph.export import ExportJob

# the runner's flag for a keep_ops file: import qgraph before torch.export.load
IMPORT_QGRAPH_FLAG = "--import-qgraph"


@dataclass(frozen=True)
class Pt2Options:
    keep_ops: bool = False  # keep the fused qgraph ops (the file then loads only where qgraph is imported)
    decode: bool = False  # the KV-cache signature (qgraph.decode) instead of (input_ids, attention_mask) -> logits


def unsupported(module: QGraphModule, options: Pt2Options) -> str | None:
    """Every plan fits (each qgraph op a finalized graph holds has an aten decomposition); decode=True needs the
    module's decode graph."""
    if options.decode and options.keep_ops:
        return "decode=True writes the aten program; keep_ops=True applies to the logits program only: drop one"
    return decode_unsupported(module) if options.decode else None


def exported_program(module: QGraphModule, example_inputs: dict[str, torch.Tensor], *,
                     keep_ops: bool = False) -> torch.export.ExportedProgram:
    """The (input_ids, attention_mask) -> logits program of a finalized module, batch and sequence dynamic;
    aten only unless `keep_ops`. The aoti target compiles this same program."""
    program = LogitsProgram(module) if keep_ops else aten_program(module)
    exported = torch.export.export(program, (), kwargs=example_inputs, dynamic_shapes=dynamic_shapes(module),
                                   strict=False)
    if not keep_ops:
        check_decomposed(exported)
    drop_stack_traces(exported)
    return exported


def check_decomposed(exported: torch.export.ExportedProgram) -> None:
    """Raise if a qgraph op is left: a decomposition that did not take would make a file no runtime can load."""
    left = qgraph_op_counts(exported.graph)
    if left:
        raise ExportError(f"qgraph ops survived the aten decomposition: {dict(left)}; each needs an entry in "
                          "qgraph.export.aten.DECOMPOSITIONS")


def decode_program(module: QGraphModule) -> torch.export.ExportedProgram:
    """The KV-cache signature's program of a finalized module (aten ops only), batch, new and past tokens
    dynamic."""
    decode = module.tied_decode_graph()
    exported = torch.export.export(decompose_qgraph_ops(decode.graph_module), signature_args(decode.example_inputs),
                                   dynamic_shapes=decode_dynamic_shapes(decode.past_count, module.info.max_seq_len),
                                   strict=False)
    check_decomposed(exported)
    drop_stack_traces(exported)
    return exported


def drop_stack_traces(exported: torch.export.ExportedProgram) -> None:
    """Remove each node's Python stack trace: a third of a small model's file, and this machine's paths."""
    for node in exported.graph.nodes:
        node.meta.pop("stack_trace", None)


def write(job: ExportJob) -> Artifact:
    """torch.export.save the program to job.path."""
    options: Pt2Options = job.options
    notes = []
    if options.decode:
        program = decode_program(job.module)
        notes.append(DECODE_NOTE)
    else:
        program = exported_program(job.module, job.example_inputs, keep_ops=options.keep_ops)
    torch.export.save(program, job.path)
    if options.keep_ops:
        notes.append("keep_ops: the file holds qgraph's ops and loads only after `import qgraph`")
    return Artifact(op_mapping=op_mapping(job.module.graph_module.graph, keep_ops=options.keep_ops), notes=notes,
                    runner_args=[IMPORT_QGRAPH_FLAG] if options.keep_ops else [])


TARGET = ExportTarget(
    name="pt2",
    suffixes=(".pt2",),
    description="torch.export program of aten ops (torch.export.load(path).module())",
    options_type=Pt2Options,
    unsupported=unsupported,
    write=write,
    runner="pt2.py",
    # the decomposed ops equal the fused ones bit for bit (int4) or to float rounding (NF4, ~1e-6), and the
    # rest of the graph runs the same aten kernels: 1e-4 leaves room for nothing but rounding
    tolerance=1e-4,
    needs_qgraph=lambda options: options.keep_ops,
)
