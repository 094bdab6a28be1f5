"""Copies and pickles of a watched module carry none of modeguard's hooks.

``copy.deepcopy`` and ``pickle`` copy a module's ``__dict__``, hook dictionaries
included. modeguard marks every hook function it registers (``HOOK_MARK``) and takes the
marked ones out of the state that ``nn.Module.__getstate__`` and ``__reduce_ex__`` hand
over, so an EMA copy or a saved model is exactly what it would be unwatched.
"""

from __future__ import annotations

#: Attribute set on every hook function modeguard registers, so pickling can strip them.
HOOK_MARK = "_modeguard_hook"


def mark(fn):
    """Mark ``fn`` as one of modeguard's hooks (kept out of copies and pickles)."""
    setattr(fn, HOOK_MARK, True)
    return fn


def strip_hooks(state: dict) -> dict:
    """A copy of a module's state without modeguard's hooks (for pickling/deepcopy)."""
    removed = []
    out = None
    for key in ("_forward_pre_hooks", "_forward_hooks"):
        hooks = state.get(key)
        if not hooks:
            continue
        ours = [hid for hid, fn in hooks.items() if getattr(fn, HOOK_MARK, False)]
        if ours:
            if out is None:
                out = dict(state)
            kept = type(hooks)((hid, fn) for hid, fn in hooks.items() if hid not in ours)
            out[key] = kept
            removed.extend(ours)
    if out is None:
        return state
    for key in ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
        extra = out.get(key)
        if extra:
            out[key] = type(extra)((k, v) for k, v in extra.items() if k not in removed)
    return out


def getstate_wrapper(wrapped, instance, args, kwargs):
    """wrapt wrapper for ``nn.Module.__getstate__`` (code that calls it directly)."""
    return strip_hooks(wrapped(*args, **kwargs))


def module_reduce_ex(self, protocol):
    """``nn.Module.__reduce_ex__`` while watching: subclasses that override __getstate__
    without calling nn.Module's (nn.LSTM, user classes) bypass the wrapper above; every
    pickle and deepcopy goes through here."""
    rv = object.__reduce_ex__(self, protocol)
    if isinstance(rv, tuple) and len(rv) > 2 and isinstance(rv[2], dict):
        state = strip_hooks(rv[2])
        if state is not rv[2]:
            rv = rv[:2] + (state,) + rv[3:]
    return rv
