"""The one error type vlamp raises for input a user can fix.

The CLI turns a :class:`VlampError` into one line on stderr and exit code 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class VlampError(ValueError):
    """A bad name, value, file or config supplied by the user; the message says what is legal."""
