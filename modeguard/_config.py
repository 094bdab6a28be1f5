"""Every setting modeguard has, and the one place that decides where each comes from.

A leaf module: it imports nothing from the package, so anything may import it (the rules
look codes up for it through the ``rule_code`` function their callers pass in). ``Config``
holds a guard's settings; ``resolve()`` builds one from the sources an entry point has,
in one order for all of them:

    explicit (a ``watch()`` argument, a ``modeguard run`` flag, a pytest command-line
    option) > environment > ini (pytest) > the entry point's defaults > Config's defaults

The one deliberate twist: ``watch(on_violation=...)`` is the code's *default* for the
action, so ``MODEGUARD=off|warn|raise|record`` switches a whole program without editing
it (``MODEGUARD=off`` installs nothing). Every bad value, from any source, is a
``ConfigError``: a ``ValueError`` whose one-line message names the source and the valid
values; the CLI turns it into exit status 2 and the pytest plugin into a usage error.
"""

from __future__ import annotations

import enum
import os
import sys
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

ENV_VAR = "MODEGUARD"
#: Environment variable per setting (``on_violation`` keeps the historic ``MODEGUARD``).
ENV = {
    "on_violation": ENV_VAR,
    "severities": "MODEGUARD_RULES",
    "fail_on": "MODEGUARD_FAIL_ON",
    "backward_sample": "MODEGUARD_BACKWARD_SAMPLE",
}

#: Ordinary training forwards followed into their autograd graph, one in this many: by
#: default none (None). Findings do not depend on it: a step reads from the gradients
#: themselves whether a backward came (``_state.GradMark``). 1 follows every forward.
DEFAULT_BACKWARD_SAMPLE = None


class ConfigError(ValueError):
    """A setting with a value modeguard cannot use; the message is one line."""


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
        raise ConfigError(f"unknown severity {value!r}; expected one of: {valid}")

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
        raise ConfigError(f"unknown on_violation {value!r}; expected one of: {valid}")


class FailOn(str, enum.Enum):
    """The lowest severity that fails a run (``modeguard run`` exits 3) or a test: one
    vocabulary for every entry point."""

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"
    NEVER = "never"

    @classmethod
    def parse(cls, value: "FailOn | Severity | str | None") -> "FailOn":
        if isinstance(value, FailOn):
            return value
        if value is None:
            return cls.NEVER
        if isinstance(value, Severity):
            return cls.NEVER if value is Severity.OFF else cls(value.label)
        if isinstance(value, str):
            key = value.strip().lower()
            key = {"warn": "warning", "none": "never", "off": "never"}.get(key, key)
            try:
                return cls(key)
            except ValueError:
                pass
        valid = ", ".join(m.value for m in cls)
        raise ConfigError(f"unknown level {value!r}; expected one of: {valid}")

    @property
    def threshold(self) -> Optional[Severity]:
        """The lowest failing severity, or None for ``never``."""
        return None if self is FailOn.NEVER else Severity[self.name]

    def fails(self, severity: Severity) -> bool:
        t = self.threshold
        return t is not None and severity >= t


def backward_sample_from_text(text: str) -> int:
    """``MODEGUARD_BACKWARD_SAMPLE=8``, ``--backward-sample 8``: decimal text."""
    try:
        return parse_backward_sample(int(text.strip()))
    except (TypeError, ValueError):
        raise ConfigError(f"expected a positive integer (1 follows every training forward), got {text!r}") from None


def parse_backward_sample(value) -> int:
    """A positive int (in code, "8" is a mistake, not a number)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"backward_sample must be a positive int (1 follows every training forward), got {type(value).__name__} {value!r}")
    if value < 1:
        raise ConfigError(f"backward_sample must be a positive int (1 follows every training forward), got {value!r}")
    return value


def _identity(code: str) -> str:
    return code


def parse_rules(rules, rule_code: Callable[[str], str] = _identity) -> Dict[str, Severity]:
    """``{"MG401": "off"}`` or ``"MG401=off,MG201=error"`` -> ``{code: Severity}``.

    ``rule_code`` turns a code or a rule name into its code, raising ``ValueError`` for an
    unknown one (``modeguard.rules.rule_code``: the one lookup there is)."""
    if rules is None:
        return {}
    if isinstance(rules, str):
        pairs = {}
        for item in filter(None, (p.strip() for p in rules.split(","))):
            code, sep, sev = item.partition("=")
            if not sep:
                raise ConfigError(f"bad rule setting {item!r}; expected CODE=SEVERITY, e.g. MG401=off")
            pairs[code.strip()] = sev.strip()
        rules = pairs
    if not isinstance(rules, Mapping):
        raise TypeError(f"rules must be a mapping of rule code to severity (or 'MG401=off,...'), got {type(rules).__name__}")
    out = {}
    for code, sev in rules.items():
        try:
            key = rule_code(str(code))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        out[key] = Severity.parse(sev)
    return out


def _is_module(obj) -> bool:
    # No torch import here (the pytest plugin imports this module in every pytest run):
    # when torch.nn is not loaded, nothing can be a module.
    nn = sys.modules.get("torch.nn")
    return nn is not None and isinstance(obj, nn.Module)


def split_frozen(frozen) -> Tuple[Tuple[str, ...], tuple]:
    """``frozen=``: a name pattern, a module, or an iterable of either -> (patterns,
    modules). A string is one pattern (never its characters), a module one module."""
    if frozen is None:
        return (), ()
    if isinstance(frozen, str) or _is_module(frozen):
        items = (frozen,)
    else:
        try:
            items = tuple(frozen)
        except TypeError:
            raise TypeError(
                f"frozen= expects an nn.Module, a name pattern like 'backbone.*', or a list of them, "
                f"got {type(frozen).__name__}"
            ) from None
    patterns, modules = [], []
    for item in items:
        if isinstance(item, str):
            patterns.append(item)
        elif _is_module(item):
            modules.append(item)
        else:
            raise TypeError(
                f"frozen= expects nn.Module objects or name patterns like 'backbone.*', got {type(item).__name__} in the list"
            )
    return tuple(patterns), tuple(modules)


@dataclass(frozen=True)
class Config:
    """A guard's settings. Its repr shows only what differs from the defaults."""

    on_violation: OnViolation = OnViolation.WARN
    #: rule code -> severity; rules not named keep their default severity.
    severities: Mapping[str, Severity] = field(default_factory=dict)
    #: module-name patterns meant to stay in eval (``frozen=["backbone.*"]``).
    frozen: Tuple[str, ...] = ()
    backward_sample: Optional[int] = DEFAULT_BACKWARD_SAMPLE
    #: what fails a run or a test (``modeguard run --fail-on``, the pytest plugin).
    fail_on: FailOn = FailOn.ERROR
    #: setting -> where its value came from ("MODEGUARD", "--fail-on", "default"...).
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def active(self) -> bool:
        return self.on_violation is not OnViolation.OFF

    def replace(self, **changes) -> "Config":
        return replace(self, **changes)

    def __repr__(self) -> str:
        default = Config()
        parts = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if f.compare and getattr(self, f.name) != getattr(default, f.name)
        ]
        return f"Config({', '.join(parts)})"


_PARSERS: Dict[str, Callable[..., Any]] = {
    "on_violation": OnViolation.parse,
    "fail_on": FailOn.parse,
    "backward_sample": parse_backward_sample,
}
#: How the environment and ini files spell a setting that is not a string in code.
_FROM_TEXT: Dict[str, Callable[[str], Any]] = {"backward_sample": backward_sample_from_text}


def _given(value) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


def _describe(kind: str, source: str, raw) -> str:
    """``MODEGUARD='banana'``, ``on_violation='banana'``, ``argument --fail-on``, ``ini option ...``."""
    if kind == "env":
        return f"{source}={raw!r}"
    return f"{source}{raw!r}" if source.endswith("=") else source


def sources_of(name: str, explicit: Mapping, ini: Mapping, defaults: Mapping, labels: Mapping,
               environ: Mapping[str, str], env: Optional[str] = None):
    """``(kind, source, raw value)`` for setting ``name``, in precedence order: explicit,
    environment (``ENV[name]``, or ``env``), ini, defaults; ``source`` names it for
    messages (``labels`` may rename the explicit and ini ones). The one statement of the
    order; an entry point's own switch (the pytest plugin's ``MODEGUARD_PYTEST``) reads
    it here too."""
    yield "explicit", labels.get(name, f"{name}="), explicit.get(name)
    env = env or ENV.get(name)
    if env is not None:
        yield "env", env, environ.get(env)
    yield "ini", labels.get(f"ini:{name}", f"ini option modeguard_{name}"), ini.get(name)
    yield "default", "default", defaults.get(name)


def first_given(layers) -> Tuple[Optional[str], Any]:
    """The ``(source, raw)`` of the first of ``layers`` that gives a value, or ``(None, None)``."""
    for _kind, source, raw in layers:
        if _given(raw):
            return source, raw
    return None, None


def resolve(
    explicit: Optional[Mapping[str, Any]] = None,
    *,
    ini: Optional[Mapping[str, Any]] = None,
    defaults: Optional[Mapping[str, Any]] = None,
    labels: Optional[Mapping[str, str]] = None,
    environ: Optional[Mapping[str, str]] = None,
    rule_code: Callable[[str], str] = _identity,
    settings: Iterable[str] = ("on_violation", "severities", "backward_sample", "fail_on"),
) -> Config:
    """Build a Config: per setting, the first source that gives a value wins, in the
    order explicit > environment > ini > ``defaults`` > Config's own default. Rule
    severities merge code by code in the same order. ``labels`` names the explicit
    source in messages (``{"fail_on": "--fail-on"}``; default ``fail_on=``). Only the
    ``settings`` an entry point uses are read, so a variable meant for another one
    (``MODEGUARD_FAIL_ON`` for ``watch()``) can neither change nor break it."""
    settings = set(settings)
    explicit, ini, defaults, labels = explicit or {}, ini or {}, defaults or {}, labels or {}
    environ = os.environ if environ is None else environ
    values: Dict[str, Any] = {}
    sources: Dict[str, str] = {}

    def layers(name):
        return sources_of(name, explicit, ini, defaults, labels, environ)

    for name, parse in _PARSERS.items():
        if name not in settings:
            continue
        for kind, source, raw in layers(name):
            if _given(raw):
                from_text = _FROM_TEXT.get(name) if kind in ("env", "ini") and isinstance(raw, str) else None
                try:
                    values[name] = parse(from_text(raw) if from_text else raw)
                except ConfigError as exc:
                    raise ConfigError(f"{_describe(kind, source, raw)}: {exc}") from None
                sources[name] = source
                break
    severities: Dict[str, Severity] = {}
    for kind, source, raw in reversed(list(layers("severities")) if "severities" in settings else []):
        if _given(raw) and raw != {}:
            try:
                severities.update(parse_rules(raw, rule_code))
            except ConfigError as exc:
                raise ConfigError(f"{_describe(kind, source, raw)}: {exc}") from None
            sources["severities"] = source
    values["severities"] = severities
    frozen = explicit.get("frozen")
    if frozen is not None:
        values["frozen"] = tuple(frozen)
    return Config(sources=sources, **values)
