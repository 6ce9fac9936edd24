"""One-line config checks: each raises ``UserError("<key>: <problem>")`` naming the first bad key. The
settings classes of every layer (methods, priors, scene, training) validate their fields with these."""

from __future__ import annotations

from typing import Any

from sdsbridge.common.errors import UserError
from sdsbridge.common.schedules import is_schedule, schedule_range


SHOWN_CHARS = 80
"""Most characters of a value an error message shows (``shown``): a hostile value may be megabytes."""


def shorten(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` on one line (runs of whitespace made one space), cut to its first ``limit`` characters and
    '... (N characters in all)' when longer. Reads only the start of ``text``."""
    head = " ".join(text[: 2 * limit + 64].split())
    if len(head) <= limit and len(text) <= 2 * limit + 64:
        return head
    return f"{head[:limit]}... ({len(text):,} characters in all)"


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters (``shorten``)."""
    return shorten(repr(value), limit)


def check(ok: bool, key: str, problem: str) -> None:
    """UserError "``key``: ``problem``" unless ``ok``."""
    if not ok:
        raise UserError(f"{key}: {problem}")


def check_choice(value: str, key: str, choices: tuple[str, ...]) -> None:
    check(value in choices, key, f"{shown(value)} is not one of {', '.join(choices)}")


def check_schedule(value: Any, key: str, low: float, high: float) -> None:
    """A number or a [start_step, start_value, end_value, end_step] schedule whose values lie in [low, high]."""
    check(is_schedule(value), key, "expected a number or [start_step, start_value, end_value, end_step] "
          "with end_step > start_step")
    lo, hi = schedule_range(value)
    check(low <= lo and hi <= high, key, f"values must lie in [{low}, {high}], got {shown(value)}")


def check_range2(value: list, key: str, low: float, high: float) -> None:
    """[min, max] with low <= min <= max <= high."""
    check(len(value) == 2 and value[0] <= value[1], key, f"expected [min, max] with min <= max, got {shown(value)}")
    check(low <= value[0] and value[1] <= high, key, f"values must lie in [{low}, {high}], got {shown(value)}")
