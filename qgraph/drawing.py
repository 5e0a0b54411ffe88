"""Write a graph picture: DOT text, rendered to SVG/PNG by Graphviz when asked."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from torch import fx

from qgraph.errors import QGraphError
from qgraph.graph import to_dot


def check_picture_request(path: Path, depth: int | None) -> None:
    """Refuse a picture that cannot be drawn (its suffix, Graphviz missing, a negative depth): what a caller
    asks before the work that makes the graph."""
    if depth is not None and depth < 0:
        raise QGraphError(f"the drawing's depth must be >= 0 (0: every node), got {depth}")
    suffix = path.suffix.lower()
    if suffix not in (".dot", ".svg", ".png"):
        raise QGraphError(f"cannot draw to {path.name}: use a .dot, .svg or .png file name")
    if suffix != ".dot" and shutil.which("dot") is None:
        raise QGraphError(f"drawing {path.name} needs Graphviz's `dot` (apt-get install graphviz); "
                          "or ask for a .dot file and render it elsewhere")


def write_graph_picture(gm: fx.GraphModule, path: Path, *, depth: int | None = 4) -> Path:
    """`path` ending in .dot gets DOT text; .svg or .png is rendered with Graphviz's `dot`."""
    check_picture_request(path, depth)
    dot_text = to_dot(gm, depth=depth or None)  # 0, as the CLI's --dot-depth: every node
    suffix = path.suffix.lower()
    if suffix == ".dot":
        path.write_text(dot_text)
        return path
    subprocess.run(["dot", f"-T{suffix[1:]}", "-o", str(path)], input=dot_text, text=True, check=True)
    return path
