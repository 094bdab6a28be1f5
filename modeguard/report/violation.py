"""Violation: one distinct problem, found at one place, counted every time it recurs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from .._config import Severity
from .._frames import Location
from ..observe.modes import ModeSite
from .text import violation_text


@dataclass(eq=False)
class Violation:
    code: str
    name: str
    severity: Severity
    headline: str
    model: str
    modules: List[str]
    location: Optional[Location]
    mode_set_at: Optional[ModeSite]
    fix: str
    why: str
    first_step: int
    count: int = 1

    @property
    def message(self) -> str:
        """What, where, why and the fix, as every text output shows it (``report.text``)."""
        return violation_text(self)

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict:
        return {
            "code": self.code,
            "name": self.name,
            "severity": self.severity.label,
            "message": self.message,
            "model": self.model,
            "modules": list(self.modules),
            "location": self.location.to_dict() if self.location else None,
            "mode_set_at": self.mode_set_at.to_dict() if self.mode_set_at else None,
            "count": self.count,
            "first_step": self.first_step,
        }

    @classmethod
    def build(cls, rule, severity, model, modules, location, mode_site, headline, step,
              kinds: frozenset = frozenset()) -> "Violation":
        return cls(
            code=rule.code, name=rule.name, severity=severity, headline=headline, model=model,
            modules=list(modules), location=location, mode_set_at=mode_site, fix=rule.fix,
            why=rule.why(kinds), first_step=step,
        )
