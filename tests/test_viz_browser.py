"""Every figure of flashnb.viz drawn by plotly.js in headless Chromium, 700 px wide (the width a notebook
shows a figure at): plotly.js logs nothing (no warning, no error), every trace is drawn, and the main
title and annotations (subplot titles, reference-line labels) fit inside the figure without overlapping.

Python-side checks cannot see what plotly.js does with a figure: hatched bars given an array of colours,
for one, log `WARN: Invalid color specifier: Array(N)` and are hatched in black (hence `style.bars`).
One page holds all the figures: plotly.js once, then each figure's div and script exactly as
`fig.write_html` / `fig.to_html` writes them, a console marker before each so a message names its figure.

It needs /usr/bin/chromium and the `playwright` package (the `test` extra); never `playwright install`.
Set FLASHNB_VIZ_SCREENSHOTS=folder to keep a screenshot of every figure.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import plotly.offline
import pytest
from viz_helpers import style_figures, tour_figures

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WIDTH = 700          # px: plotly's default figure width, what JupyterLab shows
MARK = "flashnb-figure:"
DRAW_S = 60          # generous for a loaded 2-core machine; the wait ends as soon as every plot is drawn

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium; .ci/run installs it)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is absent (pip install -e '.[test]')")

# Per figure div: traces plotly.js kept (visible ones) and the trace layers it drew (a g.trace per bar or
# scatter trace, a g.hm per heatmap), the bar layers without a single bar, and, relative to the figure's
# svg, the boxes of its texts (main title, axis titles, annotations: `inside` for those placed on data
# axes, such as a reference line's label), of its legend and of its plot areas.
INSPECT_JS = """ids => ids.map(id => {
    const el = document.getElementById(id);
    if (!el || !el._fullData || !el._fullLayout) return null;
    const layers = el.querySelectorAll('.cartesianlayer g.trace, .cartesianlayer g.hm');
    const svg = el.querySelector('svg.main-svg').getBoundingClientRect();
    const box = (node, what, text, inside) => {
        const r = node.getBoundingClientRect();
        return {what: what, text: text === undefined ? node.textContent : text, inside: !!inside,
                left: r.left - svg.left, right: r.right - svg.left, top: r.top - svg.top, bottom: r.bottom - svg.top};
    };
    const texts = [];
    el.querySelectorAll('.g-gtitle text').forEach(t => texts.push(box(t, 'title')));
    el.querySelectorAll('g[class^="g-x"][class$="title"] text, g[class^="g-y"][class$="title"] text')
        .forEach(t => texts.push(box(t, 'axis title')));
    el.querySelectorAll('.infolayer g.annotation').forEach(g => {
        const a = el._fullLayout.annotations[+g.getAttribute('data-index')];
        const t = g.querySelector('text');
        if (t) texts.push(box(t, 'annotation', undefined, a.yref !== 'paper'));
    });
    el.querySelectorAll('.infolayer g.legend').forEach(g => texts.push(box(g, 'legend', '')));
    return {
        traces: el._fullData.filter(t => t.visible === true).length,
        drawn: layers.length,
        emptyBars: Array.from(el.querySelectorAll('.cartesianlayer g.trace.bars'))
            .filter(g => g.querySelectorAll('g.point path').length === 0).length,
        width: svg.width, height: svg.height, texts: texts,
        plots: Array.from(el.querySelectorAll('.draglayer .nsewdrag')).map(r => box(r, 'plot area', '')),
    };
})"""


def _page(figures: dict) -> str:
    parts = []
    for i, (name, fig) in enumerate(figures.items()):
        parts.append(f"<script>console.log({json.dumps(MARK + name)})</script>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig{i}",
                                 default_width=f"{WIDTH}px"))
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><script type='text/javascript'>"
            f"{plotly.offline.get_plotlyjs()}</script></head><body style='margin: 0'>{''.join(parts)}</body></html>")


def _overlap(a: dict, b: dict) -> bool:
    tol = 1.0
    return (a["left"] + tol < b["right"] and b["left"] + tol < a["right"]
            and a["top"] + tol < b["bottom"] and b["top"] + tol < a["bottom"])


def _what(t: dict) -> str:
    return f"{t['what']} {t['text']!r}" if t["text"] else t["what"]


def test_every_figure_draws_cleanly_in_chromium(tmp_path):
    figures = {**style_figures(), **tour_figures()}
    page_path = tmp_path / "figures.html"
    page_path.write_text(_page(figures), encoding="utf-8")
    ids = [f"fig{i}" for i in range(len(figures))]

    messages: list[str] = []
    current = ["(before any figure)"]

    def on_console(m):
        if m.type == "log" and m.text.startswith(MARK):
            current[0] = m.text[len(MARK):]
        else:
            messages.append(f"{current[0]}: console.{m.type}: {m.text}")

    with sync_api.sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": WIDTH, "height": 900})
        try:
            page = ctx.pages[0] if ctx.pages else ctx.new_page()
            page.on("console", on_console)
            page.on("pageerror", lambda e: messages.append(f"{current[0]}: pageerror: {e}"))
            page.goto(page_path.as_uri(), timeout=DRAW_S * 1000)
            page.wait_for_function(f"ids => ({INSPECT_JS})(ids).every(p => p !== null && p.drawn === p.traces)",
                                   arg=ids, timeout=DRAW_S * 1000, polling=100)
            plots = page.evaluate(INSPECT_JS, ids)
            if os.environ.get("FLASHNB_VIZ_SCREENSHOTS"):
                out = Path(os.environ["FLASHNB_VIZ_SCREENSHOTS"])
                out.mkdir(parents=True, exist_ok=True)
                for name, div in zip(figures, ids):
                    page.locator(f"#{div}").screenshot(path=str(out / f"{name}.png"))
        finally:
            ctx.close()

    assert not messages, "plotly.js / the page logged:\n" + "\n".join(messages)
    problems = []
    for (name, fig), p in zip(figures.items(), plots):
        if p["traces"] != len(fig.data) or p["drawn"] != len(fig.data):
            problems.append(f"{name}: {len(fig.data)} traces, plotly kept {p['traces']}, drew {p['drawn']}")
        if p["emptyBars"]:
            problems.append(f"{name}: {p['emptyBars']} bar traces drew no bar")
        texts = p["texts"]
        if not any(t["what"] == "title" for t in texts):
            problems.append(f"{name}: no title drawn")
        for t in texts:
            if t["left"] < -1 or t["right"] > p["width"] + 1 or t["top"] < -1 or t["bottom"] > p["height"] + 1:
                problems.append(f"{name}: {_what(t)} leaves the {p['width']:.0f} x {p['height']:.0f} px figure "
                                f"(x {t['left']:.0f}..{t['right']:.0f}, y {t['top']:.0f}..{t['bottom']:.0f})")
            if not t["inside"]:
                for area in p["plots"]:
                    if _overlap(t, area):
                        problems.append(f"{name}: {_what(t)} overlaps a plot area")
                        break
        for i, a in enumerate(texts):
            for b in texts[i + 1:]:
                if _overlap(a, b):
                    problems.append(f"{name}: {_what(a)} overlaps {_what(b)}")
    assert not problems, "\n".join(problems)
