"""User-facing errors.

Anything the user can fix (a bad path, a corrupt file, an incompatible model, an option that does not fit)
raises `TransplantError` with one line that names the problem and the fix. The CLI prints that line and exits
with code 2; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class TransplantError(Exception):
    """A problem in the user's input, with a one-line message naming the problem and the fix."""

    exit_code = 2
