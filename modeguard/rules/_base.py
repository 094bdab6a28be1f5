"""The Rule object: one per check, holding everything users see about it.

A rule's code, name, default severity, explanation and fix live on the same class that
implements the check; ``modeguard explain``, the README table and the warning classes are
all generated from it, so they cannot drift apart.
"""

from __future__ import annotations

import textwrap
from typing import ClassVar, Dict, List

from .._config import Severity
from .._exceptions import ModeGuardError, ModeGuardInfo, ModeGuardWarning

RULES: Dict[str, "Rule"] = {}


class Rule:
    """Base class. Subclasses set the class attributes and override the event methods
    they need; each event method must be O(1) until it has decided something is wrong."""

    code: ClassVar[str]
    name: ClassVar[str]
    severity: ClassVar[Severity]
    summary: ClassVar[str]          # one line
    explanation: ClassVar[str]      # why it matters, a paragraph
    quiet_when: ClassVar[List[str]] = []
    fix: ClassVar[str]              # one line

    # Filled in by __init_subclass__.
    Warning: ClassVar[type]
    Error: ClassVar[type]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        stem = cls.__name__
        doc = f"{cls.code} {cls.name}: {cls.summary}"
        cls.Warning = type(f"{stem}Warning", (ModeGuardWarning,), {"__doc__": doc, "__module__": "modeguard"})
        cls.Info = type(f"{stem}Info", (ModeGuardInfo, cls.Warning), {"__doc__": doc, "__module__": "modeguard"})
        cls.Error = type(f"{stem}Error", (ModeGuardError,), {"__doc__": doc, "__module__": "modeguard"})
        RULES[cls.code] = cls()

    # Events. The guard calls only the ones a rule overrides.
    def on_nograd_forward(self, guard, root, snapshot) -> None:
        """After a watched model's forward under torch.no_grad()/inference_mode().
        (Grad-enabled forwards reach the rules through on_release and on_step.)"""

    def on_release(self, guard, record) -> None:
        """A grad-enabled forward's graph was freed without any backward through it."""

    def step_quiet(self, snapshot) -> bool:
        """True if ``on_step`` would certainly do nothing for a model whose new gradients
        come from a forward under ``snapshot``. Asked once per snapshot, on the slow path;
        a step where every such model is quiet for every rule skips ``on_step`` (steps with
        no new gradients at all always reach it). The default is never quiet."""
        return False

    #: Steps (with new gradients for a model) between two ``on_poll`` calls, for rules
    #: that override it.
    poll_interval: ClassVar[int] = 64

    def on_poll(self, guard, root, snapshot) -> int:
        """Every so many optimizer steps that bring a model new gradients, for what has
        no hook (MG301's ``requires_grad`` flips) or must not run at every step (MG501's
        exchange with the other ranks): look again, and return how many such steps to
        wait before the next look. The guard polls every model at the shortest interval
        its rules ask for."""
        return self.poll_interval

    #: Torch functions whose calls this rule looks at in sampled eval-mode forwards
    #: (``on_eval_call``).
    eval_calls: ClassVar[tuple] = ()

    def on_eval_call(self, guard, root, watch, func, args, kwargs) -> None:
        """A function of ``eval_calls`` is being called inside a sampled eval-mode forward of
        ``root``: the first forward after each change of its snapshot with the model in eval
        (``observe/calls.py``); training forwards are never sampled. ``args``/``kwargs`` are
        the call's, as torch's ``__torch_function__`` protocol hands them over; ``watch`` is
        the sample's ``CallWatch`` (its ``model_frame`` finds the model's module on the
        stack). Runs on the slow path: the frames may be walked."""

    def on_report(self, guard, root) -> None:
        """A report is being made (``guard.report()``, ``unwatch()``, the end of
        ``modeguard run`` or of a pytest test): what is still pending about ``root``
        counts now. Slow path."""

    def on_step(self, guard, opt_state, fresh, roots, backward_seen: bool) -> None:
        """Before ``optimizer.step()`` of a watched optimizer (for ``step(closure)``:
        when the closure first returns, still before the update). ``roots`` are the
        watched models whose parameters it updates, ``fresh`` those of them with new
        gradients since this optimizer's previous step (each one's ``source`` is the
        forward the gradients came from); ``backward_seen`` says whether the gradients of
        any of ``roots`` moved since then (see ``_state.GradMark``)."""

    def why(self, kinds: frozenset = frozenset()) -> str:
        """The one sentence of "why" a finding shows, for a finding about modules of these
        kinds of mode-sensitivity (``"dropout"``, ``"batchnorm"``, ``"custom"`` ...; empty
        when none were named). By default the explanation's first sentence; a rule whose
        harm depends on the kind (BatchNorm's statistics, dropout's randomness) says only
        what applies."""
        return first_sentence(self.explanation)

    # Documentation, generated.
    def explain(self) -> str:
        quiet = "\n".join(f"  - {q}" for q in self.quiet_when) or "  -"
        body = textwrap.fill(textwrap.dedent(self.explanation).strip(), 88)
        return (
            f"{self.code} {self.name} (default severity: {self.severity.label})\n\n"
            f"{self.summary}\n\n{body}\n\n"
            f"Stays quiet when:\n{quiet}\n\n"
            f"Fix: {self.fix}\n\n"
            f"Silence it: modeguard.watch(..., rules={{\"{self.code}\": \"off\"}}), "
            f"or `with modeguard.allow(\"{self.code}\"):` around the code.\n"
        )

    def __repr__(self) -> str:
        return f"<Rule {self.code} {self.name}>"


def first_sentence(text: str) -> str:
    flat = " ".join(text.split())
    head, dot, _ = flat.partition(". ")
    return head + "." if dot else flat


#: What each kind of mode-sensitive module does differently, in the words "why" uses.
NORM_KINDS = frozenset({"batchnorm", "instancenorm"})


def overrides(rule: Rule, event: str) -> bool:
    return getattr(type(rule), event) is not getattr(Rule, event)
