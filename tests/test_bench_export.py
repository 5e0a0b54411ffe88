"""tools/bench_export.py's command line: a target, plan, count or output path it cannot use is a usage error
before SmolLM2 loads and finalizes (a minute), not after."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # the tools import benchlib as a sibling
import bench_export  # noqa: E402


@pytest.mark.parametrize(("argv", "says"), [
    (["--targets", "pt2", "onnxx"], "argument --targets: unknown export format 'onnxx'; valid export formats "
                                    "(closest first): onnx,"),
    (["--targets", "gguf:llama"], "argument --targets: gguf target: runtime must be one of transformers, llama.cpp"),
    (["--targets", "pt2:llama.cpp"], "argument --targets: unknown pt2 option 'runtime'"),
    (["--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
    (["--plan", "lrqat"], "argument --plan: unknown plan 'lrqat'"),
])
def test_what_the_bench_cannot_use_is_refused_before_the_model_loads(monkeypatch, capsys, tmp_path, argv, says):
    monkeypatch.setattr(bench_export, "load_smollm2", lambda *args, **kwargs: pytest.fail("loaded despite bad flags"))
    with pytest.raises(SystemExit) as exit_:
        bench_export.main([*argv, "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert says in capsys.readouterr().err


def test_an_output_path_that_is_a_file_is_refused_before_the_model_loads(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bench_export, "load_smollm2", lambda *args, **kwargs: pytest.fail("loaded despite bad --out"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as exit_:
        bench_export.main(["--targets", "pt2", "--out", str(tmp_path / "a-file")])
    assert exit_.value.code == 2 and f"--out {tmp_path / 'a-file'} is a file" in capsys.readouterr().err


def test_a_known_target_passes_as_given():
    assert bench_export.export_target("pt2") == "pt2"
    assert bench_export.export_target("gguf:llama.cpp") == "gguf:llama.cpp"  # a runtime it has
