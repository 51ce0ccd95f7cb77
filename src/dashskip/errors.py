"""One exception type for everything a user can get wrong.

The CLI prints these as a single line (no traceback), and the Python API lets
them propagate, so a message must name both the problem and the fix.
"""


class DashskipError(ValueError):
    """A user-facing error: bad input, missing package, mismatched files."""
