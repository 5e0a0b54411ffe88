from qgraph.report import REWRITTEN, SKIPPED, PassReport, SiteRecord, TransformReport, format_bytes, layer_of


def test_format_bytes_picks_the_unit():
    assert [format_bytes(n) for n in (512, 2048, 3 * 2**20, 5 * 2**30)] == ["512 B", "2.00 KiB", "3.00 MiB", "5.00 GiB"]


def test_layer_of_cuts_at_the_first_index():
    assert layer_of("model.layers.3.mlp.down_proj") == "model.layers.3"
    assert layer_of("lm_head") == "lm_head"


def test_rewritten_sites_group_per_layer_and_skips_keep_their_reason():
    report = PassReport("p", {}, matched=3, records=[
        SiteRecord("model.layers.0.a", REWRITTEN, params=10, bytes_before=40, bytes_after=5, detail="2x5"),
        SiteRecord("model.layers.0.b", REWRITTEN, params=6, bytes_before=24, bytes_after=3, detail="2x3"),
        SiteRecord("lm_head", SKIPPED, reason="tied to the embedding"),
    ])
    assert (report.params, report.bytes_before, report.bytes_after) == (16, 64, 8)
    text = str(TransformReport("plan", passes=[report]))
    layer_row = next(line for line in text.splitlines() if "model.layers.0 " in line)
    assert "rewritten" in layer_row and " 2 " in layer_row and "16" in layer_row
    assert "skipped lm_head: tied to the embedding" in text
    assert "model.layers.0.a" not in text  # one row per layer, not per site
