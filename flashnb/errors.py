"""The one exception type flashnb raises for bad input.

Every message names the thing that is wrong (a file, a tensor, an option) and what to do about it.
The CLI prints such errors as a single line instead of a traceback.
"""


class FlashnbError(Exception):
    """A user-facing error: bad input, a bad file, or an unsupported configuration."""
