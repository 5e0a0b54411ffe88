import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # the tools import benchlib as a sibling
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
