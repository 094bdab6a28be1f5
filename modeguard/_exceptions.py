"""The warning and exception classes users catch or filter.

Each rule also gets its own subclasses (``StepInEvalWarning``, ``StepInEvalError``...),
made from the rule object in ``rules/_base.py`` so names and codes cannot drift apart.
"""

from __future__ import annotations


class ModeGuardWarning(UserWarning):
    """A train/eval mode problem found by modeguard (severity warning or error)."""

    violation = None  # the Violation, set on instances


class ModeGuardInfo(ModeGuardWarning):
    """An info-level finding (e.g. an evaluation graph that was built for nothing)."""


class ModeGuardError(RuntimeError):
    """Raised with ``on_violation="raise"`` at the moment a violation is detected."""

    def __init__(self, message: str, violation=None):
        super().__init__(message)
        self.violation = violation
