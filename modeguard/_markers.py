"""User declarations: modules frozen on purpose, and code where named rules are silent."""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import FrozenSet, Optional

import torch.nn as nn

from .observe import sensitivity

#: Rule codes silenced by allow() in the current context (None: none).
ALLOWED: "contextvars.ContextVar[Optional[FrozenSet[str]]]" = contextvars.ContextVar("modeguard_allowed", default=None)


def frozen(*modules: nn.Module):
    """Mark modules (and everything under them) as meant to stay in eval mode.

    ``modeguard.frozen(model.backbone)``; returns the first module so it can wrap an
    expression. Use ``modeguard.unfreeze(...)`` to take the mark back.
    """
    if not modules:
        raise TypeError("modeguard.frozen() expects at least one nn.Module")
    sensitivity.mark_frozen(modules)
    return modules[0]


def unfreeze(*modules: nn.Module) -> None:
    sensitivity.unmark_frozen(modules)


class allow(contextlib.ContextDecorator):
    """Silence the named rules in a block or function::

        with modeguard.allow("MG201"):
            mc_predictions = [model(x) for _ in range(20)]

        @modeguard.allow("MG401")
        def saliency(model, x): ...
    """

    def __init__(self, *codes: str):
        from .rules import get_rule

        if not codes:
            raise TypeError("modeguard.allow() expects one or more rule codes, e.g. allow(\"MG201\")")
        self.codes = frozenset(get_rule(c).code for c in codes)
        self._tokens = []

    def __enter__(self):
        current = ALLOWED.get()
        self._tokens.append(ALLOWED.set(self.codes | current if current else self.codes))
        return self

    def __exit__(self, *exc):
        ALLOWED.reset(self._tokens.pop())
        return False

    def _recreate_cm(self):
        return allow(*self.codes)

    def __repr__(self) -> str:
        return f"allow({', '.join(sorted(self.codes))})"
