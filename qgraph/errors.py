"""Errors qgraph raises for bad input. Each names the problem and the fix, before anything changes."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class QGraphError(Exception):
    """Base class for every error qgraph raises on purpose."""


class CaptureError(QGraphError):
    """The model could not be captured as a graph."""


class PlanError(QGraphError):
    """An unknown plan, pass or option, or an option value that cannot apply."""


class PassError(QGraphError):
    """A pass cannot apply to this graph (raised before the pass changes anything)."""


class VerificationError(QGraphError):
    """The graph a pass produced is malformed or its shapes no longer check."""


def closest_first(name: str, choices: Iterable[str]) -> list[str]:
    """All choices, the ones most similar to `name` first (what a user most likely meant)."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(name, choices, n=len(choices), cutoff=0.0)
    return close + [c for c in choices if c not in close]


def unknown_name_message(kind: str, name: str, choices: Iterable[str]) -> str:
    ordered = closest_first(name, choices)
    plural = kind + ("es" if kind.endswith("s") else "s")
    return f"unknown {kind} {name!r}; valid {plural} (closest first): {', '.join(ordered)}"


class ExportError(QGraphError):
    """A module cannot go to a deployment target, or the artifact's runtime disagreed with PyTorch."""


class PretrainedError(QGraphError):
    """A saved training state (save_pretrained) cannot be written, or read into this model."""
