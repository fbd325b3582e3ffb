"""`KaiError`: the one base of the errors kai-train raises on purpose.

Each is a failure the user can act on, and its message is one line naming the file, key or back-end
and the problem. The entry points (`kai-attest`, `kai-data`, `kai-train`) catch `KaiError` and print
that line with exit status 2 (1 for a failed `kai-data` or `kai-train` task); anything else is a bug
and keeps its traceback. Subclasses that have always been `ValueError`s (a malformed input) stay
`ValueError`s too, so code that reads a value and catches `ValueError` around it still does.
"""

from __future__ import annotations

__all__ = ["KaiError"]


class KaiError(Exception):
    """A failure the user can act on; the message is one line naming the file and the problem."""
