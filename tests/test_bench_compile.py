import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # the tools import benchlib as a sibling
import bench_compile  # noqa: E402
from bench_compile import CONFIGS, QST_SIDE_BLOCKS, plan_of  # noqa: E402


@pytest.mark.parametrize(("config", "plan", "kwargs"), [
    ("nf4-infer", "nf4", {"compile": False}),
    ("nf4-infer-compiled", "nf4", {"compile": True}),
    ("lrqat-w4", "lrqat-w4", {"compile": False}),
    ("lrqat-w4-nockpt", "lrqat-w4", {"compile": False, "checkpoint": "none"}),
    ("lrqat-w4-compiled", "lrqat-w4", {"compile": True}),
    ("qst-nf4", "qst-nf4", {"compile": False, "checkpoint": QST_SIDE_BLOCKS}),
    ("qst-nf4-compiled", "qst-nf4", {"compile": True, "checkpoint": QST_SIDE_BLOCKS}),
    ("qst-nf4-nockpt", "qst-nf4", {"compile": False, "checkpoint": "none"}),
    ("qst-nf4-nockpt-compiled", "qst-nf4", {"compile": True, "checkpoint": "none"}),  # both suffixes
])
def test_a_configuration_names_its_plan_and_transform_keywords(config, plan, kwargs):
    assert plan_of(config) == (plan, kwargs)


def test_every_configuration_has_a_plan():
    assert all(plan_of(config)[0] in ("nf4", "lrqat-w4", "qst-nf4") for config in CONFIGS)


def test_the_interleaved_table_gives_each_ratio_and_first_step():
    from bench_compile import Interleaved, interleaved_table

    timed = Interleaved(first={"lrqat-w4": 1.7, "lrqat-w4-compiled": 41.7},
                        seconds={"lrqat-w4": [2.0, 4.0, 2.0], "lrqat-w4-compiled": [1.0, 3.0, 1.5]})
    rows = interleaved_table(timed, "cpu").splitlines()
    assert rows[2] == "| lrqat-w4 | cpu | 3 | 2.00 | 1.00x | 1.7 |"
    assert rows[3] == "| lrqat-w4-compiled | cpu | 3 | 1.50 | 0.75x | 41.7 |"  # ratios 0.5, 0.75, 0.75


# --- bad input: usage errors before anything loads, and a failed configuration fails the command ----------------


@pytest.mark.parametrize(("flag", "value"), [("--batch-size", "1"), ("--block-len", "1")])
def test_an_example_too_small_to_capture_is_a_usage_error_naming_the_flag(monkeypatch, capsys, tmp_path, flag, value):
    monkeypatch.setattr(bench_compile, "run_config", lambda *args: pytest.fail("ran despite a bad size"))
    for mode in (["--run", "lrqat-w4", "--json", str(tmp_path / "lrqat-w4.json")], ["--interleave", "lrqat-w4"]):
        with pytest.raises(SystemExit) as exit_:
            bench_compile.main([*mode, flag, value])
        assert exit_.value.code == 2
        assert f"argument {flag}: must be at least 2 (the first batch is the example the model is captured with" \
            in capsys.readouterr().err


def fake_runs(monkeypatch, failing: tuple[str, ...]) -> None:
    """Each configuration's process replaced: those in `failing` fail, the others give a result."""
    def run_in_subprocess(script, flags, json_path, label, console):
        config, device = flags[flags.index("--run") + 1], flags[flags.index("--device") + 1]
        return None if config in failing else asdict(bench_compile.Result(config, device, 4, step_seconds=1.0))

    monkeypatch.setattr(bench_compile, "run_in_subprocess", run_in_subprocess)
    monkeypatch.setattr(bench_compile, "chart", lambda *args: None)


def test_failed_configurations_fail_the_command_and_leave_earlier_results_when_none_ran(monkeypatch, tmp_path):
    (tmp_path / "results.json").write_text("earlier")
    argv = ["--out", str(tmp_path), "--devices", "cpu", "--configs", "nf4-infer", "lrqat-w4"]
    fake_runs(monkeypatch, failing=("nf4-infer", "lrqat-w4"))
    with pytest.raises(SystemExit, match=r"^2 of 2 configurations failed: nf4-infer on cpu, lrqat-w4 on cpu \(errors "
                                         r"above\); nothing written"):
        bench_compile.main(argv)
    assert (tmp_path / "results.json").read_text() == "earlier"
    fake_runs(monkeypatch, failing=("lrqat-w4",))
    with pytest.raises(SystemExit, match=r"^1 of 2 configurations failed: lrqat-w4 on cpu \(errors above\); the other "
                                         "1 written"):
        bench_compile.main(argv)
    assert [r["config"] for r in json.loads((tmp_path / "results.json").read_text())] == ["nf4-infer"]
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as exit_:
        bench_compile.main([*argv, "--out", str(tmp_path / "a-file")])
    assert exit_.value.code == 2
