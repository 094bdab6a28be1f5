"""The rules, one module each. A new rule is a new file here with a Rule subclass; its
import below registers it. ``RULES`` maps codes to rule objects, in code order."""

from ._base import RULES, Rule
from .step_in_eval import StepInEval
from .eval_in_train_mode import EvalInTrainMode
from .dropout_ignores_eval import DropoutIgnoresEval
from .frozen_bn_drift import FrozenBNDrift
from .eval_graph_unused import EvalGraphUnused
from .ranks_disagree import RanksDisagree
from .step_without_backward import StepWithoutBackward

__all__ = [
    "RULES", "Rule", "StepInEval", "EvalInTrainMode", "DropoutIgnoresEval", "FrozenBNDrift", "EvalGraphUnused", "RanksDisagree",
    "StepWithoutBackward",
    "get_rule", "rule_code",
]


def get_rule(code_or_name: str) -> Rule:
    """The rule with this code (any case) or name; ``ValueError`` listing the valid ones."""
    if not isinstance(code_or_name, str):
        raise TypeError(f"a rule is named by its code or name (a str such as 'MG101'), got {type(code_or_name).__name__}")
    key = code_or_name.strip()
    if key.upper() in RULES:
        return RULES[key.upper()]
    for rule in RULES.values():
        if rule.name == key:
            return rule
    raise ValueError(f"unknown rule {code_or_name!r}; valid rules: {', '.join(f'{c} ({r.name})' for c, r in RULES.items())}")


def rule_code(code_or_name: str) -> str:
    """``"mg101"``, ``"step-in-eval"`` -> ``"MG101"`` (what ``_config.resolve`` is given)."""
    return get_rule(code_or_name).code


def rules_markdown() -> str:
    """The README's rule table, generated from the rule objects (a test keeps the README
    in sync with it)."""
    lines = ["| code | name | default | fires when | stays quiet when |", "|---|---|---|---|---|"]
    for code, r in RULES.items():
        lines.append(f"| {code} | `{r.name}` | {r.severity.label} | {r.summary} | {'; '.join(r.quiet_when)} |")
    return "\n".join(lines) + "\n"
