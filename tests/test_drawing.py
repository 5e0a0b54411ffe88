import pytest

import qgraph
from qgraph.drawing import write_graph_picture
from qgraph.errors import QGraphError


@pytest.fixture(scope="module")
def nf4_graph():
    from qgraph.models import tiny_causal_lm

    return qgraph.transform(tiny_causal_lm("llama"), "nf4").graph_module


def test_dot_file_gets_dot_text(nf4_graph, tmp_path):
    path = write_graph_picture(nf4_graph, tmp_path / "g.dot", depth=3)
    text = path.read_text()
    assert text.startswith("digraph qgraph {") and text.rstrip().endswith("}")
    assert '"model.layers.0"' in text


@pytest.mark.parametrize("depth", [None, 0])
def test_every_node_depth_names_each_fx_node(nf4_graph, tmp_path, depth):
    text = write_graph_picture(nf4_graph, tmp_path / "g.dot", depth=depth).read_text()
    assert all(f'"{node.name}"' in text for node in nf4_graph.graph.nodes)


def test_unknown_suffix_is_an_error_naming_the_choices(nf4_graph, tmp_path):
    with pytest.raises(QGraphError, match=r"\.dot, \.svg or \.png"):
        write_graph_picture(nf4_graph, tmp_path / "g.pdf")


def test_missing_graphviz_says_what_to_install(nf4_graph, tmp_path, monkeypatch):
    monkeypatch.setattr("qgraph.drawing.shutil.which", lambda name: None)
    with pytest.raises(QGraphError, match="apt-get install graphviz"):
        write_graph_picture(nf4_graph, tmp_path / "g.svg")
