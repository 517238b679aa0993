"""Option values as people type them on a command line.

``python -m monai.bundle run ... --refine false`` hands the config the *string* ``'false'`` (MONAI's CLI goes through
``fire``, which turns ``False`` into a boolean but leaves ``false``, ``0`` or ``no`` as strings or numbers), and any
non-empty string is true in Python. The bundle's configs therefore read every boolean option through
:func:`parse_bool`, which accepts what people type and refuses, by name, what is not a boolean.
"""

from __future__ import annotations

from typing import Any

__all__ = ["parse_bool"]

_TRUE = ("true", "1", "yes", "y", "on")
_FALSE = ("false", "0", "no", "n", "off")


def parse_bool(value: Any, name: str) -> bool:
    """``True`` / ``False`` from a bool, the integers 0 / 1, or (any case, surrounding spaces ignored) the strings
    ``true`` / ``false``, ``yes`` / ``no``, ``y`` / ``n``, ``on`` / ``off``, ``1`` / ``0``.

    Raises:
        ValueError: anything else (``None``, ``2``, ``'maybe'``, a list ...), naming the option ``name`` and the value.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a numpy / torch scalar
        return parse_bool(value.item(), name)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise ValueError(f"option {name}: expected a boolean (true / false, yes / no, on / off, 1 / 0), got {value!r}.")
