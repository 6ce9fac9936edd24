"""Values that change with the training step.

A scheduled value is either a plain number or ``[start_step, start_value, end_value, end_step]``
(threestudio's convention): ``start_value`` up to ``start_step``, ``end_value`` from ``end_step`` on,
linear in between.
"""

from __future__ import annotations

from typing import Any, Sequence


def is_schedule(value: Any) -> bool:
    """True if ``value`` is a number or a well-formed 4-element schedule."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 4:
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return False
        return value[3] > value[0]
    return False


def schedule_value(value: Any, step: int) -> float:
    """The value of a scheduled quantity at ``step`` (a plain number is constant)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    start_step, start_value, end_value, end_step = (float(v) for v in value)
    if step <= start_step:
        return start_value
    if step >= end_step:
        return end_value
    frac = (step - start_step) / (end_step - start_step)
    return start_value + frac * (end_value - start_value)


def schedule_range(value: Any) -> tuple[float, float]:
    """(min, max) over all steps; used to validate ranges once at load time."""
    if isinstance(value, (int, float)):
        return float(value), float(value)
    return float(min(value[1], value[2])), float(max(value[1], value[2]))
