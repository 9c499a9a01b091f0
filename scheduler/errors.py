"""Errors of the scheduler: a spec that cannot be placed as written (not a placement failure).

A job that does not fit is not an error: it is a `Failure` in the plan with its reasons.
`SpecError` is for input that makes no sense (a negative count, an unknown constraint operator,
"12Qi" of memory), raised when the value is built so the message can name the field.
"""

from __future__ import annotations


class SchedulerError(Exception):
    """Base of the scheduler's errors."""


class SpecError(SchedulerError, ValueError):
    """A node, job or resource value is malformed; the message names the field."""
