"""tools/benchlib.py's command line on bad input, with every configuration's process faked: a bad count or path is a
usage error before anything runs, a failed configuration fails the command, and --reuse and --timing-from say what
they could not use instead of crashing on it or using it silently."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # the tools import benchlib as a sibling
import benchlib  # noqa: E402
from benchlib import Bench, Result  # noqa: E402

STEPS = ["--steps", "5"]  # the fewest --steps the default --timing-steps allows
BENCH = Bench(doc="a bench of two configurations", configs=("plain", "trained"), trained=("trained",), peer="plain",
              peer_label="plain", build=lambda config, model: (model, None), script=__file__,
              default_out=Path("out/never-written"))


def settings(**changes) -> dict[str, int | str]:
    """The settings a run with the default flags records."""
    return {**benchlib._settings(3, 56, 4, 256), **changes}


def fake_runs(monkeypatch, failing: tuple[str, ...] = ()) -> list[str]:
    """Replace each configuration's process: the configurations in `failing` fail, the others give a result made
    with the default flags. Returns the configurations run, in order; charts are not drawn."""
    ran = []

    def run_in_subprocess(script, flags, json_path, label, console, threads=None, show_status=True):
        config = flags[flags.index("--run") + 1]
        ran.append(config)
        if config in failing:
            return None
        return asdict(Result(config, 5 if config in BENCH.trained else 0, settings=settings()))

    monkeypatch.setattr(benchlib, "run_in_subprocess", run_in_subprocess)
    monkeypatch.setenv("COLUMNS", "1000")  # rich folds a line at the console's width, a long path too
    monkeypatch.setattr(benchlib, "chart", lambda *args: None)
    monkeypatch.setattr(benchlib, "loss_curves", lambda *args: None)
    return ran


def usage_error(capsys, argv: list[str]) -> str:
    """The message of the usage error (exit 2) main gives for `argv`."""
    with pytest.raises(SystemExit) as exit_:
        benchlib.main(BENCH, argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def printed(capsys) -> str:
    """What main printed, on one line."""
    return " ".join(capsys.readouterr().out.split())


def earlier_results(out: Path) -> dict[str, str]:
    out.mkdir(exist_ok=True)
    files = {"results.json": json.dumps([asdict(Result("plain", 0, perplexity=9.0))]), "results.md": "| plain |\n"}
    for name, text in files.items():
        (out / name).write_text(text)
    return files


# --- a failed configuration fails the command ------------------------------------------------------------------


def test_when_every_configuration_fails_the_command_fails_and_leaves_earlier_results_alone(monkeypatch, tmp_path):
    before = earlier_results(tmp_path)
    fake_runs(monkeypatch, failing=("plain", "trained"))
    with pytest.raises(SystemExit) as exit_:
        benchlib.main(BENCH, ["--out", str(tmp_path), *STEPS])
    assert exit_.value.code == f"2 of 2 configurations failed: plain, trained (errors above); nothing written: " \
                               f"{tmp_path}/ keeps its earlier results"
    assert {name: (tmp_path / name).read_text() for name in before} == before


def test_when_some_configurations_fail_the_others_are_written_and_the_command_still_fails(monkeypatch, tmp_path):
    earlier_results(tmp_path)
    fake_runs(monkeypatch, failing=("trained",))
    with pytest.raises(SystemExit, match=r"^1 of 2 configurations failed: trained \(errors above\); the other 1 "
                                         r"written to "):
        benchlib.main(BENCH, ["--out", str(tmp_path), *STEPS])
    assert [r["config"] for r in json.loads((tmp_path / "results.json").read_text())] == ["plain"]
    assert "| trained |" not in (tmp_path / "results.md").read_text()


def test_exit_if_failed_passes_when_every_configuration_ran(tmp_path):
    benchlib.exit_if_failed(["a", "b"], {"b", "a"}, tmp_path)


# --- bad counts and paths: usage errors before anything runs ---------------------------------------------------


@pytest.mark.parametrize(("flag", "value", "least"), [
    ("--timing-steps", "0", 1), ("--eval-blocks", "0", 1), ("--batch-size", "0", 1), ("--jobs", "0", 1),
    ("--block-len", "1", 2), ("--warmup", "-1", 0), ("--steps", "-2", 1),
])
def test_a_count_below_its_least_is_a_usage_error(monkeypatch, capsys, tmp_path, flag, value, least):
    ran = fake_runs(monkeypatch)
    monkeypatch.setattr(benchlib, "run_config", lambda *args, **kwargs: pytest.fail("ran despite a bad count"))
    argv = [*STEPS, flag, value]
    assert f"argument {flag}: must be at least {least}" in usage_error(capsys, ["--out", str(tmp_path), *argv])
    assert f"argument {flag}: must be at least {least}" in usage_error(
        capsys, ["--run", "trained", "--json", str(tmp_path / "trained.json"), *argv])
    assert "not an integer" in usage_error(capsys, [*STEPS, flag, "three"])
    assert not ran


@pytest.mark.parametrize("timing_from", ["missing", "a-file"])
def test_timing_from_must_be_an_existing_directory(monkeypatch, capsys, tmp_path, timing_from):
    (tmp_path / "a-file").write_text("")
    ran = fake_runs(monkeypatch)
    message = usage_error(capsys, ["--out", str(tmp_path / "out"), *STEPS, "--timing-from", str(tmp_path / timing_from)])
    assert f"argument --timing-from: {tmp_path / timing_from}" in message
    assert ("does not exist" if timing_from == "missing" else "is not a directory") in message
    assert not ran


def test_a_configuration_without_a_timing_file_says_its_figures_are_its_own(monkeypatch, capsys, tmp_path):
    timing = tmp_path / "timing"
    timing.mkdir()
    fake_runs(monkeypatch)
    benchlib.main(BENCH, ["--out", str(tmp_path / "out"), *STEPS, "--timing-from", str(timing)])
    out = printed(capsys)
    assert f"trained: no {timing / 'trained.json'}: memory, peak RSS and step time are this run's" in out
    assert "plain: no" not in out  # an untrained configuration takes no timing: nothing to say
    (timing / "trained.json").write_text('{"config": "trained", "steps": ')  # cut short
    benchlib.main(BENCH, ["--out", str(tmp_path / "out"), *STEPS, "--timing-from", str(timing)])
    assert f"trained: {timing / 'trained.json'} is unreadable (" in printed(capsys)


def test_an_output_path_that_cannot_be_written_is_refused_before_anything_runs(monkeypatch, capsys, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    ran = fake_runs(monkeypatch)
    monkeypatch.setattr(benchlib, "run_config", lambda *args, **kwargs: pytest.fail("ran despite a bad --json"))
    assert f"--out {a_file} is a file" in usage_error(capsys, ["--out", str(a_file), *STEPS])
    assert f"--json {a_file / 'trained.json'}" in usage_error(
        capsys, ["--run", "trained", "--json", str(a_file / "trained.json"), *STEPS])
    assert f"--json {tmp_path}" in usage_error(capsys, ["--run", "trained", "--json", str(tmp_path), *STEPS])
    assert not ran


def test_the_json_of_a_run_is_written_whole_or_not_at_all(monkeypatch, tmp_path):
    path = tmp_path / "new" / "trained.json"  # a new directory, as check_writable lets through
    monkeypatch.setattr(benchlib, "run_config", lambda bench, config, *args, **kwargs: Result(config, 5))
    benchlib.main(BENCH, ["--run", "trained", "--json", str(path), *STEPS])
    assert json.loads(path.read_text())["config"] == "trained"
    with pytest.raises(TypeError):  # a write that fails half-way leaves the earlier file as it was
        benchlib.write_json(path, {"config": "trained", "steps": object()})
    assert json.loads(path.read_text())["config"] == "trained"
    assert sorted(p.name for p in path.parent.iterdir()) == ["trained.json"]  # no temporary file left


# --- --reuse: what it cannot trust, it runs again ----------------------------------------------------------------


def test_reuse_runs_again_a_result_made_before_a_flag_this_run_sets(monkeypatch, capsys, tmp_path):
    old = settings()
    for flag in ("warmup", "decay", "seed"):  # what results recorded before those flags existed lack
        del old[flag]
    (tmp_path / "plain.json").write_text(json.dumps(asdict(Result("plain", 0, settings=old))))
    (tmp_path / "trained.json").write_text(json.dumps(asdict(Result("trained", 5, settings=settings()))))
    ran = fake_runs(monkeypatch)
    benchlib.main(BENCH, ["--out", str(tmp_path), *STEPS, "--reuse"])
    assert ran == ["plain"]
    out = printed(capsys)
    assert f"plain: running it again: {tmp_path / 'plain.json'} records no warmup, decay, seed (made before those " \
           "flags existed)" in out
    assert f"trained: reused {tmp_path / 'trained.json'}" in out
    # a stored result of another seed is still refused, not overwritten
    (tmp_path / "plain.json").write_text(json.dumps(asdict(Result("plain", 0, settings=settings(seed=1)))))
    with pytest.raises(SystemExit, match="seed 1, not 0"):
        benchlib.main(BENCH, ["--out", str(tmp_path), *STEPS, "--reuse"])


@pytest.mark.parametrize(("stored", "why"), [
    ('{"config": "plain", "st', "is unreadable (Unterminated string"),
    ("{}", "is not a result (Result.__init__() missing 2 required positional arguments: 'config' and 'steps')"),
    (json.dumps({**asdict(Result("plain", 0, settings=settings())), "extra": 1}),
     "is not a result (Result.__init__() got an unexpected keyword argument 'extra')"),
    ("[]", "is not a result ("),
    (json.dumps({**asdict(Result("plain", 0)), "settings": None}), "is not a result (steps 0, settings None)"),
])
def test_reuse_runs_again_a_stored_result_it_cannot_read_and_says_which_and_why(monkeypatch, capsys, tmp_path, stored,
                                                                                 why):
    (tmp_path / "plain.json").write_text(stored)
    ran = fake_runs(monkeypatch)
    benchlib.main(BENCH, ["--out", str(tmp_path), *STEPS, "--reuse", "--configs", "plain"])
    assert ran == ["plain"]
    assert f"plain: running it again: {tmp_path / 'plain.json'} {why}" in printed(capsys)
