"""What a deployment target is: a name, the file suffixes it writes, what it cannot express, a writer and
the script that runs its artifact in the target's own runtime.

Targets are data (one `ExportTarget` per file under qgraph/export/, the way passes are `PassSpec`s), so
`qgraph.export` can check a module against every target before it writes anything, and name the ones
that fit when one does not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from qgraph.module import QGraphModule

RUNNERS_DIR = Path(__file__).parent / "runners"


@dataclass
class Artifact:
    """What a target's writer reports about the file it wrote."""

    # what each qgraph op (or other notable node) became, e.g. {"qgraph::int4_linear x210": "com.microsoft::MatMulNBits"}
    op_mapping: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # extra files written beside the artifact (external data, tokenizer), included in the size
    extra_files: list[Path] = field(default_factory=list)
    # passed to the runner after the standard arguments (e.g. a session option)
    runner_args: list[str] = field(default_factory=list)
    # how this artifact is checked when the target's options decide it (a runtime chosen by option, a tolerance
    # derived from what the writer rounded); None: the target's runner, tolerance and relative_tolerance
    runner: str | None = None
    tolerance: float | None = None
    relative_tolerance: float | None = None


@dataclass(frozen=True)
class ExportTarget:
    """One deployment target.

    unsupported(module, options) -> None when the module fits, else why not (one sentence with the fix);
    it runs before anything is written. write(job) writes job.module to job.path (an ExportJob, see
    qgraph.export; the path is a temporary name that export moves into place once its runtime has run it)
    and returns an Artifact.
    runner is a script under qgraph/export/runners/ that loads the artifact in the target's runtime in a
    fresh process (without qgraph unless needs_qgraph(options)) and writes its logits; tolerance is the
    largest |logits difference| against the PyTorch module that the target accepts.
    """

    name: str
    suffixes: tuple[str, ...]
    description: str
    options_type: type
    unsupported: Callable[[QGraphModule, Any], str | None]
    write: Callable[[Any], Artifact]  # takes a qgraph.export.ExportJob (defined there: it imports this module)
    runner: str
    tolerance: float
    needs_qgraph: Callable[[Any], bool] = lambda options: False
    # relative tolerance against the logits' range, for runtimes that round activations (llama.cpp)
    relative_tolerance: float = 0.0
    # the file carries the model's tokenizer (GGUF: tokenizer.ggml.*): export takes tokenizer=
    takes_tokenizer: bool = False

    def option_names(self) -> list[str]:
        return [f.name for f in fields(self.options_type)]

    @property
    def runner_path(self) -> Path:
        return RUNNERS_DIR / self.runner

    def runtime_check(self, artifact: Artifact, options: Any) -> RuntimeCheck:
        """How `artifact` is run and judged: the artifact's own choices where it made them, else the target's."""
        return RuntimeCheck(
            runner=RUNNERS_DIR / (artifact.runner or self.runner),
            runner_args=tuple(artifact.runner_args),
            tolerance=self.tolerance if artifact.tolerance is None else artifact.tolerance,
            relative_tolerance=(self.relative_tolerance if artifact.relative_tolerance is None
                                else artifact.relative_tolerance),
            allow_qgraph=self.needs_qgraph(options),
        )


@dataclass(frozen=True)
class RuntimeCheck:
    """How an artifact was run in its runtime (runner script, its arguments, qgraph importable or not) and the
    logits difference accepted: what a benchmark needs to run the same artifact the same way again."""

    runner: Path
    runner_args: tuple[str, ...]
    tolerance: float
    relative_tolerance: float
    allow_qgraph: bool
