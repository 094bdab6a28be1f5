"""Configuration: severities, what to do on a violation, and per-rule overrides.

One plain dataclass holds a guard's settings; its repr shows only what differs from the
defaults. The ``MODEGUARD`` environment variable (``off|warn|raise|record``) overrides the
default action for a whole run, so a job can be switched without touching code.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field, fields
from typing import Mapping, Optional

ENV_VAR = "MODEGUARD"


class Severity(enum.IntEnum):
    """How bad a violation is. ``OFF`` disables a rule."""

    OFF = 0
    INFO = 1
    WARNING = 2
    ERROR = 3

    @classmethod
    def parse(cls, value: "Severity | str") -> "Severity":
        if isinstance(value, Severity):
            return value
        if isinstance(value, str):
            key = value.strip().upper()
            aliases = {"WARN": "WARNING", "ERR": "ERROR", "IGNORE": "OFF", "NONE": "OFF"}
            key = aliases.get(key, key)
            if key in cls.__members__:
                return cls[key]
        valid = ", ".join(m.name.lower() for m in cls)
        raise ValueError(f"unknown severity {value!r}; expected one of: {valid}")

    @property
    def label(self) -> str:
        return self.name.lower()


class OnViolation(str, enum.Enum):
    """What a guard does when a rule fires."""

    WARN = "warn"      # emit a ModeGuardWarning pointing at the user's line
    RAISE = "raise"    # raise ModeGuardError (warnings and errors); info is still warned
    RECORD = "record"  # only collect into guard.violations
    OFF = "off"        # install nothing at all

    @classmethod
    def parse(cls, value: "OnViolation | str") -> "OnViolation":
        if isinstance(value, OnViolation):
            return value
        if isinstance(value, str):
            try:
                return cls(value.strip().lower())
            except ValueError:
                pass
        valid = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"unknown on_violation {value!r}; expected one of: {valid}")


def env_on_violation() -> Optional[OnViolation]:
    """The action forced by the environment, if any."""
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return None
    try:
        return OnViolation.parse(raw)
    except ValueError as exc:
        raise ValueError(f"{ENV_VAR}={raw!r}: {exc}") from None


@dataclass
class Config:
    """A guard's settings."""

    on_violation: OnViolation = OnViolation.WARN
    #: rule code -> severity; rules not named keep their default severity.
    severities: Mapping[str, Severity] = field(default_factory=dict)

    def __repr__(self) -> str:
        default = Config()
        parts = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        ]
        return f"Config({', '.join(parts)})"


def parse_rule_overrides(rules: "Mapping[str, str | Severity] | str | None") -> dict:
    """``{"MG401": "off"}`` or ``"MG401=off,MG201=error"`` -> ``{code: Severity}``.

    Unknown codes and severities raise ``ValueError`` naming the valid ones.
    """
    from .rules import RULES  # late: rules import this module

    if rules is None:
        return {}
    if isinstance(rules, str):
        pairs = {}
        for item in filter(None, (p.strip() for p in rules.split(","))):
            code, sep, sev = item.partition("=")
            if not sep:
                raise ValueError(f"bad rule setting {item!r}; expected CODE=SEVERITY, e.g. MG401=off")
            pairs[code.strip()] = sev.strip()
        rules = pairs
    if not isinstance(rules, Mapping):
        raise TypeError(f"rules must be a mapping of rule code to severity, got {type(rules).__name__}")
    out = {}
    for code, sev in rules.items():
        key = str(code).strip().upper()
        if key not in RULES:
            by_name = {r.name: c for c, r in RULES.items()}
            if str(code) in by_name:
                key = by_name[str(code)]
            else:
                raise ValueError(f"unknown rule {code!r}; valid rules: {', '.join(RULES)}")
        out[key] = Severity.parse(sev)
    return out
