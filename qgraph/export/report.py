"""What an export did: per target, what each qgraph op became, the file's size, and the parity measured."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from qgraph.export.check import Parity
from qgraph.export.target import RuntimeCheck
from qgraph.report import format_bytes


@dataclass
class ExportReport:
    target: str
    path: Path
    plan: str
    file_bytes: int
    fp32_bytes: int
    op_mapping: dict[str, str]
    parity: Parity
    tolerance: float
    export_seconds: float
    load_seconds: float
    run_seconds: list[float]
    runtime: RuntimeCheck  # how the artifact was run: a benchmark reruns it the same way
    notes: list[str] = field(default_factory=list)

    def __rich__(self) -> Group:
        title = Text.assemble(("qgraph export ", "bold"), (self.target, "bold cyan"), f"  {self.path}  plan {self.plan}")
        ops = Table(title="what each op became", title_justify="left")
        ops.add_column("in the finalized graph")
        ops.add_column(f"in the {self.target} artifact")
        for source, result in self.op_mapping.items():
            ops.add_row(source, result)
        numbers = Table(title="artifact", title_justify="left")
        for column in ("file", "vs fp32 weights", "export", "load (fresh process)", "max |logits diff|",
                       "PyTorch vs itself ±1 ulp", "tolerance", "top-1 agreement"):
            numbers.add_column(column, justify="right")
        numbers.add_row(format_bytes(self.file_bytes), f"{self.file_bytes / self.fp32_bytes:.2f}x",
                        f"{self.export_seconds:.1f}s", f"{self.load_seconds:.1f}s", f"{self.parity.max_abs_diff:.2e}",
                        f"{self.parity.rounding_floor:.2e}", f"{self.tolerance:.2g}",
                        f"{self.parity.top1_agreement:.1%} of {self.parity.positions}")
        notes = [Text(f"  {note}", style="yellow") for note in self.notes]
        return Group(title, ops, numbers, *notes)

    def __str__(self) -> str:
        buffer = io.StringIO()
        Console(file=buffer, width=140, no_color=True, highlight=False).print(self)
        return buffer.getvalue()
