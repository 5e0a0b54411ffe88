"""What each pass did, per layer: the records passes return and their rich rendering."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

REWRITTEN, SKIPPED, ADDED = "rewritten", "skipped", "added"


@dataclass
class SiteRecord:
    """One site a pass looked at: rewritten (with sizes before/after), skipped (with why) or added."""

    path: str
    action: str
    reason: str = ""
    params: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    detail: str = ""


@dataclass
class PassReport:
    name: str
    options: dict[str, Any]
    matched: int = 0
    records: list[SiteRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    ran: bool = True  # False when skipped by name

    def with_action(self, action: str) -> list[SiteRecord]:
        return [r for r in self.records if r.action == action]

    @property
    def rewritten(self) -> list[SiteRecord]:
        return self.with_action(REWRITTEN)

    @property
    def skipped(self) -> list[SiteRecord]:
        return self.with_action(SKIPPED)

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.records)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.records)

    @property
    def params(self) -> int:
        return sum(r.params for r in self.records if r.action != SKIPPED)


@dataclass
class TransformReport:
    """Every pass's report plus the capture and verification cost, in plan order."""

    plan: str
    passes: list[PassReport] = field(default_factory=list)
    capture_seconds: float = 0.0
    trainable_params: int = 0
    frozen_params: int = 0
    decoding: str = ""  # how generate decodes: with the KV-cached graph (qgraph.decode) or without, and why
    dtype: str = ""  # what transform(dtype=) cast, when it cast anything (qgraph.cast)
    compiled: str = ""  # how compile=True compiled the graph (qgraph.compile)

    def __getitem__(self, name: str) -> PassReport:
        for report in self.passes:
            if report.name == name:
                return report
        raise KeyError(f"no pass {name!r} in this report; passes: {[p.name for p in self.passes]}")

    def __rich__(self) -> Group:
        parts: list[Any] = [Text.assemble(
            ("qgraph plan ", "bold"), (self.plan, "bold cyan"),
            f"  capture {self.capture_seconds:.1f}s  trainable {self.trainable_params:,}  "
            f"frozen {self.frozen_params:,} parameters",
        )]
        parts.append(_summary_table(self.passes))
        if self.dtype:
            parts.append(Text(f"  {self.dtype}", style="dim"))
        if self.compiled:
            parts.append(Text(f"  {self.compiled}", style="dim"))
        if self.decoding:
            parts.append(Text(f"  {self.decoding}", style="dim" if self.decoding.startswith("KV") else "yellow"))
        for report in self.passes:
            if report.records:
                parts.append(_site_table(report))
            parts.extend(Text(f"  skipped {r.path}: {r.reason}", style="yellow") for r in report.skipped)
            parts.extend(Text(f"  {report.name}: {note}", style="yellow") for note in report.notes)
        return Group(*parts)

    def __str__(self) -> str:
        buffer = io.StringIO()
        Console(file=buffer, width=140, no_color=True, highlight=False).print(self)
        return buffer.getvalue()


def _summary_table(passes: list[PassReport]) -> Table:
    table = Table(title="passes", title_justify="left")
    table.add_column("pass", no_wrap=True)
    for column in ("matched", "rewritten", "skipped", "params", "before", "after", "time"):
        table.add_column(column, justify="right", no_wrap=True)
    for report in passes:
        if not report.ran:
            table.add_row(report.name, "-", "-", "-", "-", "-", "-", "skipped by name", style="dim")
            continue
        table.add_row(
            report.name, str(report.matched), str(len(report.rewritten)), str(len(report.skipped)),
            f"{report.params:,}", format_bytes(report.bytes_before), format_bytes(report.bytes_after),
            f"{report.seconds:.2f}s",
        )
    return table


def _site_table(report: PassReport) -> Table:
    """Per layer: rewritten sites of one decoder block on one row; a skipped site always on its own."""
    table = Table(title=f"{report.name}: per layer", title_justify="left")
    table.add_column("layer / site", no_wrap=True)
    table.add_column("action", no_wrap=True)
    for column in ("sites", "params", "before", "after"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("detail")
    for key, action, records in _group_by_layer(report.records):
        style = "yellow" if action == SKIPPED else None
        details = ["reason below"] if action == SKIPPED else sorted({r.detail for r in records})
        table.add_row(
            key, action, str(len(records)), f"{sum(r.params for r in records):,}",
            format_bytes(sum(r.bytes_before for r in records)), format_bytes(sum(r.bytes_after for r in records)),
            "; ".join(details) if len(details) <= 2 else f"{len(details)} shapes", style=style,
        )
    return table


def layer_of(path: str) -> str:
    """`model.layers.3.mlp.down_proj` -> `model.layers.3`: the path up to its first index."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return path


def _group_by_layer(records: list[SiteRecord]) -> list[tuple[str, str, list[SiteRecord]]]:
    groups: dict[tuple[str, str], list[SiteRecord]] = {}
    for record in records:
        key = record.path if record.action == SKIPPED else layer_of(record.path)
        groups.setdefault((key, record.action), []).append(record)
    return [(key, action, group) for (key, action), group in groups.items()]


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
