import shutil

import pytest

from qgraph.cli import main, parse_options


def test_parse_options_reads_literals_and_keeps_plain_strings():
    assert parse_options(["blocksize=128", "include=('a.*', 'b')", "phi_format=int-packed"]) == {
        "blocksize": 128, "include": ("a.*", "b"), "phi_format": "int-packed"}


def test_parse_options_rejects_a_pair_without_equals():
    from qgraph.errors import QGraphError

    with pytest.raises(QGraphError, match="OPTION=VALUE"):
        parse_options(["blocksize"])


def test_plans_lists_every_plan(capsys):
    assert main(["plans"]) == 0
    out = capsys.readouterr().out
    assert "nf4" in out and "lrqat-w4" in out and "rtn-w4" in out


def test_inspect_prints_the_report_and_draws_dot(tmp_path, capsys):
    dot = tmp_path / "graph.dot"
    assert main(["inspect", "tiny-llama", "--plan", "nf4", "--dot", str(dot)]) == 0
    out = capsys.readouterr().out
    assert "quantize_nf4" in out and "model.layers.1" in out
    assert dot.read_text().startswith("digraph") and "qgraph.nf4_linear" in dot.read_text()


def test_inspect_unknown_plan_exits_2_with_the_valid_plans(capsys):
    assert main(["inspect", "tiny-llama", "--plan", "nf5"]) == 2
    assert "unknown plan 'nf5'; valid plans (closest first): nf4" in capsys.readouterr().out


def test_inspect_print_after_prints_graph_code(capsys):
    assert main(["inspect", "tiny-llama", "--print-after", "quantize_nf4"]) == 0
    out = capsys.readouterr().out
    assert "graph after quantize_nf4" in out and "torch.ops.qgraph.nf4_linear.default(" in out


def test_demo_refuses_steps_for_a_plan_with_nothing_to_train_before_loading(capsys, monkeypatch):
    import qgraph.demo

    monkeypatch.setattr(qgraph.demo, "load_smollm2", lambda: pytest.fail("the model must not be loaded"))
    assert main(["demo", "--plan", "nf4", "--steps", "5"]) == 2
    assert "has nothing to train" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")
def test_inspect_renders_svg(tmp_path):
    svg = tmp_path / "graph.svg"
    assert main(["inspect", "tiny-gpt2", "--dot", str(svg), "--dot-depth", "0"]) == 0
    assert svg.read_text().lstrip().startswith("<?xml") and "nf4_linear" in svg.read_text()
