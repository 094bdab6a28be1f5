"""Automatic watching: every outermost module call becomes a watched model and every
optimizer is watched, with no change to the user's code.

This is a thin layer over one Guard. Optimizers are picked up through PyTorch's global
optimizer step hooks. Modules have no global hook that is cheap enough: a global forward
pre-hook pushes every submodule call onto torch's slow path (about +20% on a deep model),
so ``nn.Module.__call__`` is patched instead, restorably, with a wrapper that costs one
counter check for calls nested inside an already watched model.

Each module is classified once, on its first outermost call, and remembered by id:

- *skipped*: no parameters and no mode-sensitive children (a loss, an activation, a
  torchvision transform). Calls pass straight through, and modules nested in it can
  still become roots (a parameter-free wrapper that calls the real model).
- *foreign*: watched explicitly by another guard (``modeguard.watch``). Its calls count as
  outermost so its submodules do not become roots here as well.
- *root*: watched by this guard. Its checks run from the wrapper itself, only when it is
  called as the outermost module, never as a forward hook. So a submodule that is also
  called directly (``model.encoder(x)`` from a feature monitor) is a root of its own for
  those direct calls only: its checks stay silent while it runs inside ``model``, and no
  problem is reported twice. And because roots carry no hooks, a ``copy.deepcopy`` of a
  watched model (an EMA copy, a target network) copies nothing of modeguard's; the copy
  becomes a separate root on its first call, like a teacher or a GAN's second network.

Modules that are built and never called are never looked at.
"""

from __future__ import annotations

import warnings
import weakref
from typing import List, Optional

import torch.nn as nn
import torch.optim.optimizer as optimizer_module

from . import _compiled
from ._exceptions import ModeGuardWarning
from ._frames import user_frame
from ._guard import Guard, guard_of
from ._hotpath import _flags, _tracing, before_step, make_post_hook, make_pre_hook
from ._patches import Patches
from .observe.modes import MODE_EPOCH, STRUCTURE_EPOCH
from .observe.snapshot import ModeSnapshot


#: > 0 while inside an outermost (root or foreign) call: nothing nested is a root. One
#: counter for the process, not one per thread: a thread-local costs about 800
#: instructions per module call (counted with callgrind), against a list item's few.
#: ``+= 1`` on it cannot be interleaved under the GIL (no thread switch inside those
#: bytecodes); what a single counter gives up is in the README's Limitations.
_depth = [0]
_session: Optional["AutoSession"] = None

_SKIP = "skip"
_FOREIGN = "foreign"


class _Root:
    """The checks of one auto-discovered model, called by the ``__call__`` wrapper."""

    __slots__ = ("st", "pre", "post")

    def __init__(self, st, pre, post):
        self.st = st      # its RootState
        self.pre = pre
        self.post = post


class AutoSession:
    def __init__(self, guard: Guard):
        self.guard = guard
        # id(module) -> _SKIP | _FOREIGN | _Root. Keyed by id, not by the module, because
        # a user module may define __eq__ and so be unhashable; a finalizer removes the
        # entry when the module dies, before its id can be reused.
        self._known: dict = {}
        # id(submodule of a watched model) -> (weak ref to it, the model's name, its
        # path), so naming a newly called module costs one lookup, however many models
        # were watched before.
        self._paths: dict = {}
        self._patches = Patches()
        #: names of the models watched so far, in discovery order (kept after stop()).
        self.root_names: List[str] = []

    def _install(self) -> None:
        session = self
        orig = nn.Module.__call__
        known = self._known
        depth = _depth
        # Torch's own __call__ (_wrapped_call_impl) is two lines: nested calls (every
        # submodule of a watched model) run them inline, so the patch costs them one
        # counter check and no extra Python frame.
        inline = orig is getattr(nn.Module, "_wrapped_call_impl", None)

        def __call__(self, *args, **kwargs):
            # Torch's __call__ inlined where it is the plain one: one frame less per call.
            direct = inline and self._compiled_call_impl is None
            if depth[0]:
                return self._call_impl(*args, **kwargs) if direct else orig(self, *args, **kwargs)
            if _tracing() or _flags._is_compiling_flag:
                # Dynamo is tracing a compiled function that calls the model: a constant
                # here, so the graph holds torch's own __call__ and no guard on our state.
                return orig(self, *args, **kwargs)
            entry = known.get(id(self))
            if entry is None:
                entry = session._discover(self)
            if entry is _SKIP:
                return self._call_impl(*args, **kwargs) if direct else orig(self, *args, **kwargs)
            depth[0] += 1
            try:
                if entry is _FOREIGN:
                    return orig(self, *args, **kwargs)
                st = entry.st
                # The pre-hook has work only after a mode or structure change, or with
                # modules to probe; the same test as in it, without the call.
                if MODE_EPOCH[0] != st.epoch or STRUCTURE_EPOCH[0] != st.struct_epoch or st.probing:
                    entry.pre(self, args, kwargs)
                output = self._call_impl(*args, **kwargs) if direct else orig(self, *args, **kwargs)
                entry.post(self, args, output)
                return output
            finally:
                depth[0] -= 1

        __call__._modeguard_original = orig
        self._patches.replace(nn.Module, "__call__", __call__)
        self._patches.add_handle(optimizer_module.register_optimizer_step_pre_hook(self._step_pre))

    # ---- discovery (slow path: once per module) -------------------------------------------

    def _discover(self, module: nn.Module):
        guard = self.guard
        try:
            if not guard.active:
                entry = _SKIP
            elif (inner := _compiled.optimized_module(module)) is not None:
                # torch.compile(model): its calls are the model's, seen from outside.
                entry = self._known.get(id(inner)) or self._discover(inner)
                if isinstance(entry, _Root):
                    _compiled.go_outside(guard, entry.st)
            elif guard_of(module) not in (None, guard):
                entry = _FOREIGN
            elif next(module.parameters(), None) is None and not ModeSnapshot(module).entries:
                entry = _SKIP
            else:
                entry = self._watch(module)
        except Exception as exc:
            # Watching must never break the user's program; this module goes unchecked.
            entry = _SKIP
            try:
                warnings.warn(
                    f"modeguard: cannot watch {type(module).__name__} ({type(exc).__name__}: {exc}); "
                    f"its train/eval modes are not checked",
                    ModeGuardWarning, stacklevel=3,
                )
            except Exception:  # warnings turned into errors (-W error): stay silent
                pass
        self._known[id(module)] = entry
        weakref.finalize(module, self._known.pop, id(module), None)
        return entry

    def _watch(self, module: nn.Module) -> _Root:
        guard = self.guard
        name = self._name_for(module)
        # No hooks on the module: the wrapper runs the checks, for outermost calls only;
        # hooks would also run when it is called inside another root (double reports).
        guard.watch_model(module, name=name, hooks=False)
        st = guard.root_state(module)
        if st.sample_due:
            # Found in eval mode: its first call takes the pre-hook path, like the first
            # call after a mode change, so that MG202 samples it (observe/calls.py).
            st.epoch = -1
        self.root_names.append(st.name)
        for path, sub in module.named_modules():
            if path:
                self._paths.setdefault(id(sub), (weakref.ref(sub), st.name, path))
        return _Root(st, make_pre_hook(st), make_post_hook(guard, st, caller_depth=2))

    def _name_for(self, module: nn.Module) -> str:
        """``Net``; ``Net.encoder`` for a submodule of a watched model; ``Net (ema)`` with
        the caller's variable name when another watched model has the same class. A
        torch class (``Sequential``, ``Linear``) says little: one held by the calling
        method's object is named after it, ``LitClassifier.net`` (a LightningModule's
        ``training_step`` calling ``self.net(x)``)."""
        found = self._paths.get(id(module))
        if found is not None and found[0]() is module:
            return f"{found[1]}.{found[2]}"
        base = type(module).__name__
        if type(module).__module__.startswith("torch."):
            held = _attribute_of_caller(module)
            if held is not None and not self.guard.name_taken(held):
                return held
        if not self.guard.name_taken(base):
            return base
        var = _variable_name(module)
        return f"{base} ({var})" if var else base

    # ---- optimizers ------------------------------------------------------------------

    def _step_pre(self, optimizer, args, kwargs):
        guard = self.guard
        if _tracing() or _flags._is_compiling_flag:
            return None  # a compiled function that steps: dynamo traces this hook
        if guard._active:  # the attribute, not the property: this runs on every step
            ost = guard._opts.get(id(optimizer))
            if ost is None:
                guard.watch_optimizer(optimizer, hooks=False, check_params=False)
                ost = guard.optimizer_state(optimizer)
            # An optimizer also passed to modeguard.watch() has its own step hooks on the
            # same guard: checking the step here too would count it twice.
            if ost is not None and not ost.handles:
                return before_step(guard, ost, optimizer, args, kwargs)
        return None

    def _uninstall(self) -> None:
        self._patches.restore()
        self._known.clear()
        self._paths.clear()
        _depth[0] = 0


def _variable_name(module: nn.Module) -> Optional[str]:
    """The name the user's calling code has for ``module`` (slow path, for reports)."""
    f = user_frame(2)
    if f is None:
        return None
    for scope in (f.f_locals, f.f_globals):
        for key, value in scope.items():
            if value is module and not key.startswith("_"):
                return key
    self_obj = f.f_locals.get("self")
    if self_obj is not None:
        attrs = dict(getattr(self_obj, "__dict__", {}))
        attrs.update(getattr(self_obj, "_modules", None) or {})
        for key, value in attrs.items():
            if value is module:
                return f"self.{key}"
    return None


def _attribute_of_caller(module: nn.Module) -> Optional[str]:
    """``Owner.attr`` when the user's calling method's ``self`` holds ``module`` as a
    submodule (slow path, once per module)."""
    f = user_frame(2)
    owner = f.f_locals.get("self") if f is not None else None
    if not isinstance(owner, nn.Module) or owner is module:
        return None
    for key, value in owner._modules.items():
        if value is module:
            return f"{type(owner).__name__}.{key}"
    return None


def start(on_violation: str = "warn", rules=None, frozen=None, backward_sample=None, *, config=None) -> Guard:
    """Begin automatic watching; returns the Guard that collects everything. The
    settings are ``watch()``'s, or a resolved ``config`` (the entry points resolve their
    own flags, environment and ini first). Calling it while a session is active returns
    that session's guard."""
    global _session
    if _session is not None:
        return _session.guard
    guard = Guard(on_violation=on_violation, rules=rules, frozen=frozen, backward_sample=backward_sample, config=config)
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


def watched_names() -> List[str]:
    """Names of the models the active session has watched so far."""
    return list(_session.root_names) if _session is not None else []
