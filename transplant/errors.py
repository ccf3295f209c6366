"""User-facing errors.

Anything the user can fix (a bad path, a corrupt file, an incompatible model, an option that does not fit)
raises `TransplantError` with one line that names the problem and the fix. The CLI prints that line and exits
with code 2; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

MAX_MESSAGE_CHARS = 1000  # a value echoed whole (a 50 MB `loss.name`) must not make the line megabytes long


class TransplantError(Exception):
    """A problem in the user's input, with a one-line message naming the problem and the fix.

    A message longer than `MAX_MESSAGE_CHARS` loses its middle: the start names the problem, the end usually
    holds the fix, and a huge value quoted in between is what made it long."""

    exit_code = 2

    def __init__(self, message: object = "", *args: object) -> None:
        text = str(message)
        if len(text) > MAX_MESSAGE_CHARS:
            head, tail = MAX_MESSAGE_CHARS * 2 // 3, MAX_MESSAGE_CHARS // 3 - 40
            text = f"{text[:head]} [... {len(text) - head - tail:,} characters cut ...] {text[-tail:]}"
        super().__init__(text, *args)


def shorten(text: object, limit: int = 80) -> str:
    """`text` cut to about `limit` characters for an error line: a 50 MB path or name echoed whole would turn
    one line into megabytes (the start says what it was, the length how much was cut)."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[: max(limit - 30, 8)]}... ({len(text):,} characters)"


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception from a library (or its type's name when it has no text), at most `limit`
    characters: what goes between the parentheses of a one-line TransplantError."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:limit]
