"""Where a command writes: its output paths checked before the work that fills them (a load, a training run,
an export), so a path that cannot be written fails in a second, not after minutes."""

from __future__ import annotations

import os
from pathlib import Path

from qgraph.errors import QGraphError


def check_output_dir(path: Path | str, flag: str) -> None:
    """A directory the command writes into: an existing one must be a writable directory; a new one is made
    under the nearest existing directory, which must be writable."""
    path = Path(path).expanduser()
    _check_room_for(path, path, flag)


def check_output_file(path: Path | str, flag: str) -> None:
    """A file the command writes: not a directory, in a directory check_output_dir takes."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise QGraphError(f"{flag} {path} is a directory; give a file name (e.g. {path / 'out'})")
    _check_room_for(path, path.parent, flag)


def _check_room_for(path: Path, directory: Path, flag: str) -> None:
    """`directory` (where `path` goes) exists as a writable directory or can be made: named in terms of `path`."""
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is under {existing}, a file"
        raise QGraphError(f"{flag} {path} {where}, not a directory: give a path under a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise QGraphError(f"{flag} {path}: {existing} is not writable; give a path you can write to")
