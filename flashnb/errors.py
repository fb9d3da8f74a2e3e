"""The one exception type flashnb raises for bad input.

Every message names the thing that is wrong (a file, a tensor, an option) and what to do about it.
The CLI prints such errors as a single line instead of a traceback, and so does a notebook (IPython shows
an exception through its `_render_traceback_` where it has one).
"""


class FlashnbError(Exception):
    """A user-facing error: bad input, a bad file, or an unsupported configuration."""

    def _render_traceback_(self) -> list[str]:
        """What IPython and JupyterLab show for it: the one line, not the frames inside flashnb."""
        return [f"FlashnbError: {self}"]
