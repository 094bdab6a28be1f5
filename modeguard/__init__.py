"""modeguard: catch PyTorch train/eval mode bugs while your program runs.

    guard = modeguard.watch(model, optimizer)

The public face only re-exports; the pieces live in private modules (``_guard``,
``_hotpath``, ``_state``, ``_auto``), observe/ (how modes, sensitivity and graphs are
seen), rules/ (checks), report/ (output) and one thin module per entry point. Names are loaded on first use
(PEP 562), so that merely having modeguard installed (its pytest plugin is loaded by
every pytest run) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._config import FailOn, OnViolation, Severity
from ._exceptions import ModeGuardError, ModeGuardInfo, ModeGuardWarning
from ._version import __version__

if TYPE_CHECKING:
    # What the lazy names below resolve to, spelled out for IDEs and type checkers; a
    # test keeps this block equal to what __getattr__ returns at run time.
    from ._guard import Guard, watch
    from ._markers import allow, frozen, unfreeze
    from .observe.modes import ModeSite
    from .observe.sensitivity import register_sensitive
    from .report import ModeMap, Report, Violation
    from .rules import RULES, Rule, get_rule

    class StepInEvalWarning(ModeGuardWarning): ...
    class StepInEvalInfo(ModeGuardInfo, StepInEvalWarning): ...
    class StepInEvalError(ModeGuardError): ...
    class EvalInTrainModeWarning(ModeGuardWarning): ...
    class EvalInTrainModeInfo(ModeGuardInfo, EvalInTrainModeWarning): ...
    class EvalInTrainModeError(ModeGuardError): ...
    class DropoutIgnoresEvalWarning(ModeGuardWarning): ...
    class DropoutIgnoresEvalInfo(ModeGuardInfo, DropoutIgnoresEvalWarning): ...
    class DropoutIgnoresEvalError(ModeGuardError): ...
    class FrozenBNDriftWarning(ModeGuardWarning): ...
    class FrozenBNDriftInfo(ModeGuardInfo, FrozenBNDriftWarning): ...
    class FrozenBNDriftError(ModeGuardError): ...
    class EvalGraphUnusedWarning(ModeGuardWarning): ...
    class EvalGraphUnusedInfo(ModeGuardInfo, EvalGraphUnusedWarning): ...
    class EvalGraphUnusedError(ModeGuardError): ...
    class RanksDisagreeWarning(ModeGuardWarning): ...
    class RanksDisagreeInfo(ModeGuardInfo, RanksDisagreeWarning): ...
    class RanksDisagreeError(ModeGuardError): ...
    class StepWithoutBackwardWarning(ModeGuardWarning): ...
    class StepWithoutBackwardInfo(ModeGuardInfo, StepWithoutBackwardWarning): ...
    class StepWithoutBackwardError(ModeGuardError): ...

_LAZY = {
    "watch": "._guard",
    "Guard": "._guard",
    "frozen": "._markers",
    "unfreeze": "._markers",
    "allow": "._markers",
    "register_sensitive": ".observe.sensitivity",
    "ModeSite": ".observe.modes",
    "Violation": ".report",
    "Report": ".report",
    "ModeMap": ".report",
    "RULES": ".rules",
    "Rule": ".rules",
    "get_rule": ".rules",
}
# The public submodules; everything named with a leading underscore, and observe/, is
# implementation and may change between releases.
_SUBMODULES = {"demo", "observe", "report", "rules", "testing"}
_EAGER = [
    "FailOn", "OnViolation", "Severity", "ModeGuardError", "ModeGuardInfo", "ModeGuardWarning", "__version__",
]


def _rule_classes() -> dict:
    """``StepInEvalWarning``, ``StepInEvalError``, ... made from the rule objects."""
    from .rules import RULES

    return {cls.__name__: cls for rule in RULES.values() for cls in (rule.Warning, rule.Info, rule.Error)}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    elif name == "__all__":
        value = [*_LAZY, *_EAGER, *_rule_classes()]
    else:
        classes = _rule_classes() if name[:1].isupper() else {}
        if name not in classes:
            raise AttributeError(f"module 'modeguard' has no attribute {name!r}")
        value = classes[name]
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES | set(_rule_classes()))


def load_ipython_extension(ipython):  # `%load_ext modeguard`
    from ._ipython import load_ipython_extension as _load

    _load(ipython)


def unload_ipython_extension(ipython):
    from ._ipython import unload_ipython_extension as _unload

    _unload(ipython)
