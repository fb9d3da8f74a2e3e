"""Execute notebooks and commit only their small, stable outputs (for strict nbval).

    python -m flashnb.notebook_outputs notebooks/03_windowing.ipynb [more.ipynb ...] [--timeout 600]
                                      [--sanitize-with tests/nbval_sanitize.cfg]

For each notebook: run every cell top to bottom in a fresh kernel of *this* Python environment (the
kernel nbval's --nbval-current-env uses, started in the notebook's folder), then write the notebook back
with

- the outputs and execution counts of ordinary cells kept: these are what `pytest --nbval` compares
  (after tests/nbval_sanitize.cfg), so they must be small and deterministic; the sanitizer is applied
  to them here too (a scratch folder is committed as TEMP_DIR), so a rerun rewrites the same bytes;
- the outputs of cells marked `# NBVAL_IGNORE_OUTPUT` (plots, widgets, timings, disk measurements) or
  `# NBVAL_SKIP` removed, and their execution counts cleared;
- no widget state (notebook metadata `widgets`), no per-cell timing metadata.

It refuses to write a notebook whose kept outputs contain a widget, a plotly figure or more than
MAX_OUTPUT_CHARS characters: mark such a cell `# NBVAL_IGNORE_OUTPUT` instead. Then check that the
outputs are stable by running `python -m pytest notebooks/NAME.ipynb` twice.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

MAX_OUTPUT_CHARS = 4000   # a kept cell's outputs, all together: a table printout, not a figure
UNSTABLE_MIME = ("application/vnd.jupyter.widget-view+json", "application/vnd.plotly.v1+json")
IGNORE_MARKERS = ("NBVAL_IGNORE_OUTPUT", "PYTEST_VALIDATE_IGNORE_OUTPUT", "NBVAL_SKIP")
IGNORE_TAGS = ("nbval-ignore-output", "nbval-skip")


def output_ignored(cell) -> bool:
    """True where nbval will not compare the cell's outputs (a marker comment line or a cell tag)."""
    for line in cell.source.splitlines():
        line = line.strip()
        if line.startswith("#") and line.lstrip("#").strip() in IGNORE_MARKERS:
            return True
    return any(tag in IGNORE_TAGS for tag in cell.get("metadata", {}).get("tags", []))


def sanitize_patterns(cfg: Path | None) -> list[tuple[str, str]]:
    """The (regex, replacement) pairs of an nbval sanitize file, read as nbval reads them."""
    if cfg is None:
        return []
    return re.findall(r"^regex: (.*)$\n^replace: (.*)$", cfg.read_text(), flags=re.MULTILINE)


def default_sanitize_file(notebook: Path) -> Path | None:
    """tests/nbval_sanitize.cfg of the repository holding `notebook`, if there is one."""
    for folder in notebook.resolve().parents:
        if (folder / "tests" / "nbval_sanitize.cfg").is_file():
            return folder / "tests" / "nbval_sanitize.cfg"
    return None


def _sanitize(text, patterns):
    if not isinstance(text, str):
        return text
    for regex, replace in patterns:
        text = re.sub(regex, replace, text)
    return text


def _output_text(output) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    return "".join(str(v) for v in output.get("data", {}).values())


def clean(nb, path: str = "notebook", patterns: list[tuple[str, str]] = ()) -> list[str]:
    """Strip `nb` in place as described in the module docstring and apply the sanitize `patterns` to the
    text of kept outputs; returns one problem per offending kept cell (empty when it may be committed)."""
    problems = []
    nb.metadata.pop("widgets", None)
    for i, cell in enumerate(nb.cells):
        cell.get("metadata", {}).pop("execution", None)
        if cell.cell_type != "code":
            continue
        if output_ignored(cell):
            cell.outputs = []
            cell.execution_count = None
            continue
        for out in cell.outputs:
            if "text" in out:
                out["text"] = _sanitize(out["text"], patterns)
            for mime, value in out.get("data", {}).items():
                if mime.startswith("text/"):
                    out["data"][mime] = _sanitize(value, patterns)
            bad = [m for m in UNSTABLE_MIME if m in out.get("data", {})]
            if bad or "plotly" in out.get("data", {}).get("text/html", ""):
                problems.append(f"{path}: cell {i} shows a widget or plot ({bad or 'plotly html'}); "
                                "make '# NBVAL_IGNORE_OUTPUT' its first line")
            if out.get("output_type") == "error":
                problems.append(f"{path}: cell {i} raised {out.get('ename')}: {out.get('evalue')}")
        size = sum(len(_output_text(o)) for o in cell.outputs)
        if size > MAX_OUTPUT_CHARS:
            problems.append(f"{path}: cell {i} prints {size} characters (> {MAX_OUTPUT_CHARS}); print less or "
                            "make '# NBVAL_IGNORE_OUTPUT' its first line")
    return problems


def _current_env_kernel_manager():
    """A kernel manager for a Python kernel of this interpreter (as nbval --nbval-current-env)."""
    import ipykernel.kernelspec
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    class _ThisEnv(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            return self.kernel_spec_class(resource_dir=ipykernel.kernelspec.RESOURCES,
                                          **ipykernel.kernelspec.get_kernel_dict())

    return KernelManager(kernel_name="python3", kernel_spec_manager=_ThisEnv())


def execute(path: Path, timeout: int = 600):
    """Run the notebook at `path` top to bottom (a cell error raises) and return it, executed."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    km = _current_env_kernel_manager()
    client = NotebookClient(nb, km=km, timeout=timeout, store_widget_state=False, record_timing=False,
                            resources={"metadata": {"path": str(path.parent.resolve())}})
    try:
        client.execute(cwd=str(path.parent.resolve()))
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    return nb


def refresh(path: Path, timeout: int = 600, sanitize_with: Path | None = None) -> list[str]:
    """Execute, clean and (when clean found no problem) write back one notebook; returns the problems.
    sanitize_with: an nbval sanitize file (default: the repository's tests/nbval_sanitize.cfg)."""
    import nbformat

    nb = execute(path, timeout)
    problems = clean(nb, str(path), sanitize_patterns(sanitize_with or default_sanitize_file(path)))
    if not problems:
        nbformat.validate(nb)
        text = nbformat.writes(nb) + "\n"
        path.write_text(text, encoding="utf-8")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flashnb.notebook_outputs", description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="+", type=Path, help="the .ipynb files to execute and rewrite")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    ap.add_argument("--sanitize-with", type=Path, default=None,
                    help="nbval sanitize file applied to kept outputs (default: tests/nbval_sanitize.cfg above "
                         "the notebook)")
    args = ap.parse_args(argv)
    failed = False
    for path in args.notebooks:
        if not path.is_file():
            print(f"notebook_outputs: error: {path} is not a file", file=sys.stderr)
            return 2
        try:
            problems = refresh(path, args.timeout, args.sanitize_with)
        except Exception as e:  # nbclient's CellExecutionError names the cell and carries its traceback
            problems = [f"{path} did not run to the end (nothing written):\n{e}"]
        for p in problems:
            print(f"notebook_outputs: error: {p}", file=sys.stderr)
        failed |= bool(problems)
        print(f"{path}: {'NOT written' if problems else 'written'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
