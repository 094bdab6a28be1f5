"""modeguard: catch PyTorch train/eval mode bugs while your program runs.

    guard = modeguard.watch(model, optimizer)

The public face only re-exports; the pieces live in observe/ (hooks), rules/ (checks),
report/ (output) and one thin module per entry point.
"""

from ._config import OnViolation, Severity
from ._exceptions import ModeGuardError, ModeGuardInfo, ModeGuardWarning
from ._version import __version__
from .guard import Guard, watch
from .markers import allow, frozen, unfreeze
from .observe.modes import ModeSite
from .observe.sensitivity import register_sensitive
from .report import ModeMap, Report, Violation
from .rules import RULES, Rule, get_rule


def _export_rule_classes(namespace: dict) -> list:
    names = []
    for rule in RULES.values():
        for cls in (rule.Warning, rule.Info, rule.Error):
            namespace[cls.__name__] = cls
            names.append(cls.__name__)
    return names


__all__ = [
    "watch", "Guard", "frozen", "unfreeze", "allow", "register_sensitive",
    "ModeGuardWarning", "ModeGuardInfo", "ModeGuardError", "Violation", "Report", "ModeMap", "ModeSite",
    "Severity", "OnViolation", "RULES", "Rule", "get_rule", "__version__",
] + _export_rule_classes(globals())


def load_ipython_extension(ipython):  # `%load_ext modeguard`
    from ._ipython import load_ipython_extension as _load

    _load(ipython)


def unload_ipython_extension(ipython):
    from ._ipython import unload_ipython_extension as _unload

    _unload(ipython)
