"""Collecting violations: one entry per distinct problem, and what to do about a new one.

A problem is distinct by rule, model and the user's line: the same bug recurring at the
same place is one entry with a running count, while two models with the same bug stepping
through one shared helper (``def update(model, opt, x)``) are two. What happens to a new
or worsened entry is an *action*, a callable ``action(rule, violation)``, in the manner of
typeguard's ``warn_on_error``: ``warn_on_violation``, ``raise_on_violation`` and
``record_only`` are the three that ``on_violation="warn"|"raise"|"record"`` choose.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Dict, List, Optional, Tuple

from .._config import OnViolation, Severity
from .._frames import user_stacklevel
from .violation import Violation

Action = Callable[[object, Violation], None]


def stacklevel() -> int:
    """warnings.warn stacklevel that lands on the user's own frame (past modeguard, torch
    and the frameworks in between; see ``_frames``), for our caller's warnings.warn."""
    return user_stacklevel(1)


def record_only(rule, violation: Violation) -> None:
    """Keep it in ``guard.violations``; nothing else."""


def warn_on_violation(rule, violation: Violation) -> None:
    """A warning of the rule's own class, filed under the user's file and line."""
    category = rule.Info if violation.severity is Severity.INFO else rule.Warning
    w = category(violation.message)
    w.violation = violation
    loc = violation.location
    if loc is not None:
        # Our own dedupe already decided this is new; the module name lets users
        # filter by their module as with any warning.
        module = os.path.splitext(os.path.basename(loc.file))[0]
        warnings.warn_explicit(w, category, loc.file, loc.line, module=module)
    else:
        warnings.warn(w, stacklevel=stacklevel())


def raise_on_violation(rule, violation: Violation) -> None:
    """Raise the rule's error for warnings and errors (stopping a bad step before it
    updates anything); info is still only warned."""
    if violation.severity >= Severity.WARNING:
        raise rule.Error(violation.message, violation)
    warn_on_violation(rule, violation)


ACTIONS: Dict[OnViolation, Action] = {
    OnViolation.WARN: warn_on_violation,
    OnViolation.RAISE: raise_on_violation,
    OnViolation.RECORD: record_only,
    OnViolation.OFF: record_only,
}


class ViolationLog:
    """The distinct violations a guard found, in the order they were found."""

    def __init__(self):
        self._items: List[Violation] = []
        self._by_key: Dict[Tuple, Violation] = {}

    def add(self, rule, severity: Severity, model: str, modules, location, mode_site, headline: str,
            step: int, kinds: frozenset = frozenset()) -> Optional[Violation]:
        """Count this occurrence. Returns the violation when the user must hear of it (new,
        or the same place got worse), else None."""
        key = (rule.code, model, location.file if location else None, location.line if location else None)
        found = self._by_key.get(key)
        if found is not None:
            found.count += 1
            if severity <= found.severity:
                return None
            # The same place got worse (some modules in eval, then the whole model): the
            # user must hear about the escalation, and "raise" must raise.
            found.severity, found.headline, found.modules = severity, headline, list(modules)
            found.why = rule.why(kinds)
            return found
        v = Violation.build(rule, severity, model, modules, location, mode_site, headline, step, kinds)
        self._by_key[key] = v
        self._items.append(v)
        return v

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()
        self._by_key.clear()
