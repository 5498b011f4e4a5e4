"""One exception type for every problem a user can fix.

A `DpnbError` message is one line that says what is wrong and how to fix it. The command line
prints it without a traceback, and notebooks that call `dpnb.notebook.setup_notebook()` show it the
same way, so a bad parameter reads as an instruction, not as a stack trace.
"""

from __future__ import annotations


class DpnbError(Exception):
    """A problem with the user's input or environment, with the fix in the message."""


def require(condition: bool, message: str) -> None:
    """Raise `DpnbError(message)` unless `condition` holds."""
    if not condition:
        raise DpnbError(message)
