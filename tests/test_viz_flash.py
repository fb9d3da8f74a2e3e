"""Notebook 01's figures (flashnb.viz.flash) and widget (flashnb.widgets.flash), on a synthetic profile."""

from __future__ import annotations

import pytest
from flash_helpers import synthetic_profile
from viz_helpers import bar_series
from flashnb.device.costmodel import table2
from flashnb.device.profile import Profile
from flashnb.viz import style as S
from flashnb.viz.flash import bundling_figure, format_table2, layouts_figure, table2_figure, throughput_figure, \
    where
from flashnb.widgets.flash import read_time_text, read_time_widget


def _profile() -> Profile:
    return Profile(synthetic_profile(latency_s=1e-4, bandwidth=1e9))


def test_throughput_figure_has_every_in_flight_count_and_the_paper():
    fig = throughput_figure(_profile())
    names = [t.name for t in fig.data]
    assert sum(n.endswith("(measured)") for n in names) == 4
    assert sum("(modeled by the fitted profile)" in n for n in names) == 4
    measured = [t for t in fig.data if t.name == "8 in flight (measured)"][0]
    assert list(measured.x) == [4096, 16384, 65536, 262144, 1 << 20, 4 << 20]
    assert measured.y[0] == 4096 / (1e-4 / 8 + 4096 / 1e9) / 1e9
    assert fig.layout.xaxis.type == "log"
    paper = [t for t in fig.data if t.name.endswith("(paper)")]
    assert [t.marker.color for t in paper] == [S.color("unbundled"), S.color("bundled")]
    assert all(t.marker.symbol == "star" for t in paper)
    assert any("measured on synthetic" in a.text for a in fig.layout.annotations)


def test_where_names_the_backend():
    p = _profile()
    assert "AIO" not in where(p) and "threads" not in where(p)   # a profile that does not record it
    p.data["backend"] = "aio"
    assert "direct I/O, native AIO, " in where(p)
    p.data["backend"] = "threads"
    assert "reader threads" in where(p)


def test_read_time_text_and_widget():
    p = _profile()
    t = read_time_text(p, 16384, 8)
    secs = 1e9 / p.throughput(16384, 8)
    assert f"{secs:.2f} s" in t and "61,036 random reads of 16 KiB" in t and "2.25 GB/s" in t
    assert "with 8 reads in flight</b>" in t
    assert "only for 8 KiB" in read_time_text(p, 4096, 1)
    w = read_time_widget(p)
    chunk, threads, out = w.children
    before = out.value
    chunk.value = 4096
    assert out.value != before and "of 4 KiB" in out.value
    threads.value = 1
    assert "with 1 read in flight<" in out.value and threads.description == "in flight"


def test_table_and_cost_figures():
    text = format_table2(table2())
    lines = text.splitlines()
    assert len(lines) == 6 and lines[3].startswith("+predictor") and "738" in lines[3]
    fig = table2_figure(_profile())
    series = ["Table 2, M1 Max (paper)", "the paper's device (left) and this disk (right) (modeled by the cost model)",
              "this disk (modeled by the cost model)"]
    # one trace per colour; one legend entry per look (the two modeled series look alike: one entry names both)
    assert [t.name for t in fig.data if t.showlegend is not False] == series[:2]
    names = [r.name for r in table2()]
    paper, modeled, mine = (bar_series(fig, s) for s in series)
    assert [paper[n][0] for n in names] == [2196, 1090, 738, 164, 87]
    techniques = [S.color(n) for n in ("naive", "hybrid", "predictor", "windowing", "all")]
    assert [paper[n][1] for n in names] == techniques                      # paper: outlined in each colour
    assert [modeled[n][1] for n in names] == techniques == [mine[n][1] for n in names]
    assert {t.marker.pattern.shape for t in fig.data if "modeled" in t.name} == {"/"}  # modeled: hatched
    assert {t.xaxis for t in fig.data if t.name == series[2]} == {"x2"}     # this disk on its own panel
    assert {t.offsetgroup for t in fig.data if t.xaxis == "x"} == {"paper", "modeled"}  # two bars per configuration
    b = bundling_figure(_profile())
    assert len(b.data) == 2 and b.data[1].y[0] < b.data[0].y[0]       # bundled is faster on the paper device
    assert [t.marker.color for t in b.data] == [S.color("unbundled"), S.color("bundled")]
    assert b.layout.yaxis.type != "log" and b.layout.yaxis.rangemode == "tozero"   # heights in the times' ratio


def test_layouts_figure():
    from flashnb.lab.flash import LayoutRun

    # two calls of 10 neurons of 8 KiB: 160 KiB needed, read in 0.82 ms (bundled) and 1.64 ms (unbundled);
    # bundled's calls took 0.3 and 0.52 ms: 0.273 and 0.158 GB/s each
    rows = [LayoutRun(lay, 2, 10, 4, 8192, r, 163840, 163840, 0.0, True, calls)
            for lay, r, calls in (("bundled", 20, (0.3e-3, 163840 / 0.2e9 - 0.3e-3)),
                                  ("unbundled", 40, (163840 / 0.2e9,) * 2))]
    fig = layouts_figure(rows)
    assert [t.y[0] for t in fig.data] == pytest.approx([0.2, 0.1]) and "10 requests/call" in fig.data[0].text[0]
    bars = fig.data[0].error_y    # whiskers from the slowest call to the fastest
    assert 0.2 + bars.array[0] == pytest.approx(81920 / 0.3e-3 / 1e9)
    assert 0.2 - bars.arrayminus[0] == pytest.approx(81920 / (163840 / 0.2e9 - 0.3e-3) / 1e9)
    assert list(fig.data[1].error_y.array) == list(fig.data[1].error_y.arrayminus) == [0]   # equal calls
    assert [t.name for t in fig.data] == ["bundled (measured)", "unbundled (measured)"]
    assert "4 in flight" in fig.layout.title.text
