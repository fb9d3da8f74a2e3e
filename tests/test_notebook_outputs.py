"""flashnb.notebook_outputs.clean: what a committed notebook keeps (no kernel needed)."""

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from flashnb.notebook_outputs import MAX_OUTPUT_CHARS, clean, output_ignored


def _nb(*cells):
    nb = new_notebook(cells=list(cells))
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {"x": "5 MB of plotly.js"}}}
    return nb


def test_keeps_stable_text_and_strips_ignored_cells_and_widget_state():
    table = new_code_cell("print(table)", execution_count=1,
                          outputs=[new_output("stream", name="stdout", text="naive 2196 ms\n")])
    plot = new_code_cell("# NBVAL_IGNORE_OUTPUT\nfig", execution_count=2, metadata={"execution": {"iopub.execute_input": "2026-01-01T00:00:00Z"}},
                         outputs=[new_output("display_data", data={"application/vnd.plotly.v1+json": {}})])
    tagged = new_code_cell("timings", execution_count=3, metadata={"tags": ["nbval-ignore-output"]},
                           outputs=[new_output("stream", name="stdout", text="12 ms\n")])
    nb = _nb(new_markdown_cell("# lesson"), table, plot, tagged)
    assert clean(nb) == []
    assert "widgets" not in nb.metadata
    assert nb.cells[1].outputs[0]["text"] == "naive 2196 ms\n" and nb.cells[1].execution_count == 1
    for cell in nb.cells[2:]:
        assert cell.outputs == [] and cell.execution_count is None and "execution" not in cell.metadata
    nbformat.validate(nb)


def test_refuses_plots_widgets_errors_and_long_outputs_in_compared_cells():
    widget = new_code_cell("box", execution_count=1, outputs=[new_output(
        "execute_result", execution_count=1,
        data={"application/vnd.jupyter.widget-view+json": {"model_id": "ab"}, "text/plain": "VBox()"})])
    long = new_code_cell("print(x)", execution_count=2,
                         outputs=[new_output("stream", name="stdout", text="x" * (MAX_OUTPUT_CHARS + 1))])
    error = new_code_cell("1/0", execution_count=3,
                          outputs=[new_output("error", ename="ZeroDivisionError", evalue="division by zero",
                                              traceback=[])])
    problems = clean(_nb(widget, long, error), "nb.ipynb")
    assert len(problems) == 3
    assert "cell 0" in problems[0] and "NBVAL_IGNORE_OUTPUT" in problems[0]
    assert "cell 1" in problems[1] and "characters" in problems[1]
    assert "ZeroDivisionError" in problems[2]


def test_markers_are_comment_lines_as_nbval_reads_them():
    assert output_ignored(new_code_cell("x = 1\n#  NBVAL_IGNORE_OUTPUT\n"))
    assert output_ignored(new_code_cell("# NBVAL_SKIP\nslow()"))
    assert not output_ignored(new_code_cell("print('NBVAL_IGNORE_OUTPUT')"))


def test_the_repository_sanitizer_is_applied_to_kept_outputs_and_is_idempotent():
    from pathlib import Path

    from flashnb.notebook_outputs import default_sanitize_file, sanitize_patterns

    cfg = default_sanitize_file(Path(__file__).parent.parent / "notebooks" / "01_flash_characteristics.ipynb")
    assert cfg is not None and cfg.name == "nbval_sanitize.cfg"
    patterns = sanitize_patterns(cfg)
    text = ("FlashStore('/home/ci/tmp/flashnb-nb-lyr9jeb0/bundled', opt, bundled) at 0x7f3a2b1c9d10; "
            "/tmp/tmpab12cd/x.bin; 12 ms\n")
    cell = new_code_cell("store", execution_count=1, outputs=[new_output("stream", name="stdout", text=text)])
    assert clean(_nb(cell), patterns=patterns) == []
    once = cell.outputs[0]["text"]
    assert once == "FlashStore('TEMP_DIR/bundled', opt, bundled) at 0xADDRESS; TEMP_PATH; 12 ms\n"
    assert clean(_nb(cell), patterns=patterns) == [] and cell.outputs[0]["text"] == once


def test_committed_text_outputs_fit_the_notebook_width():
    """JupyterLab breaks a longer printed line mid-word: every committed text line of every notebook fits
    flashnb.text.WIDTH (the lessons wrap their sentences with flashnb.text.wrap)."""
    from pathlib import Path

    from flashnb.text import WIDTH

    long = []
    for path in sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb")):
        for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
            for output in cell.get("outputs", []):
                text = output.get("text", "") or output.get("data", {}).get("text/plain", "")
                long += [f"{path.name} cell {i}: {line[:60]}..." for line in text.splitlines() if len(line) > WIDTH]
    assert not long, long
