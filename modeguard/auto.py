"""Automatic watching: every outermost module call becomes a watched model and every
optimizer is watched, with no change to the user's code.

This is a thin layer over one Guard. Optimizers are picked up through PyTorch's global
optimizer step hooks. Modules have no global hook that is cheap enough: a global forward
pre-hook pushes every submodule call onto torch's slow path (about +20% on a deep model),
so ``nn.Module.__call__`` is patched instead, restorably, with a wrapper that costs one
counter check for calls nested inside an already watched model. Modules without
parameters or mode-sensitive children (a loss, an activation) are remembered and skipped.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn as nn
import torch.optim.optimizer as optimizer_module

from .guard import Guard, guard_of
from .observe.snapshot import ModeSnapshot

_depth = [0]  # > 0 while inside a watched model's call: nothing nested becomes a root
_session: Optional["AutoSession"] = None


class AutoSession:
    def __init__(self, guard: Guard):
        self.guard = guard
        self._ignored: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
        self._orig_call = nn.Module.__call__
        self._handles = []

    def _install(self) -> None:
        session = self
        orig = self._orig_call
        roots = self.guard._roots
        ignored = self._ignored

        def __call__(self, *args, **kwargs):
            if _depth[0] or self in ignored:
                return orig(self, *args, **kwargs)
            if id(self) not in roots:
                session._discover(self)
            _depth[0] += 1
            try:
                return orig(self, *args, **kwargs)
            finally:
                _depth[0] -= 1

        __call__._modeguard_original = orig
        nn.Module.__call__ = __call__
        self._handles = [
            optimizer_module.register_optimizer_step_pre_hook(self._step_pre),
            optimizer_module.register_optimizer_step_post_hook(self._step_post),
        ]

    def _discover(self, module: nn.Module) -> None:
        if guard_of(module) is not None or not self.guard.active:
            self._ignored.add(module)  # watched explicitly by another guard, or closing
            return
        has_params = next(module.parameters(), None) is not None
        if not has_params and not ModeSnapshot(module).entries:
            self._ignored.add(module)
            return
        self.guard.watch_model(module)

    def _ost(self, optimizer):
        ost = self.guard.optimizer_state(optimizer)
        if ost is None:
            self.guard.watch_optimizer(optimizer, _check_params=False, _hooks=False)
            ost = self.guard.optimizer_state(optimizer)
        return ost

    def _step_pre(self, optimizer, args, kwargs):
        if self.guard.active:
            self.guard.before_step(self._ost(optimizer), args, kwargs)

    def _step_post(self, optimizer, args, kwargs):
        if self.guard.active:
            self.guard.after_step(self._ost(optimizer))

    def _uninstall(self) -> None:
        if nn.Module.__call__ is not self._orig_call:
            nn.Module.__call__ = self._orig_call
        for h in self._handles:
            h.remove()
        self._handles = []


def start(on_violation: str = "warn", rules=None, frozen=None) -> Guard:
    """Begin automatic watching; returns the Guard that collects everything.
    Calling it while a session is active returns that session's guard."""
    global _session
    if _session is not None:
        return _session.guard
    guard = Guard(on_violation=on_violation, rules=rules, frozen=frozen)
    session = AutoSession(guard)
    if guard.active:
        session._install()
    _session = session
    return guard


def stop() -> Optional[Guard]:
    """End automatic watching and unwatch everything it watched. Returns the guard (its
    violations stay readable), or None if no session was active."""
    global _session
    session, _session = _session, None
    if session is None:
        return None
    session._uninstall()
    session.guard.unwatch()
    return session.guard


def current() -> Optional[Guard]:
    return _session.guard if _session is not None else None


def active() -> bool:
    return _session is not None
