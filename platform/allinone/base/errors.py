"""One line of an error for a user: the first line of its message, bounded in length."""

from __future__ import annotations


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first non-empty line of ``error``'s message (its type's name when it has none)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:limit]
