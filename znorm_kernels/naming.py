"""How an error names an entry of a call: its position and, where the caller knows it, its parameter's name.
Every check of the package words its errors this way, so a user can find the offending parameter."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["where"]


def where(position: int, names: Sequence[str] | None, what: str = "tensor") -> str:
    """'tensor at position 3 (parameter 'fc.weight')', or without the name when ``names`` lacks it."""
    if names is not None and position < len(names) and names[position]:
        return f"{what} at position {position} (parameter {names[position]!r})"
    return f"{what} at position {position}"
