"""Whether a parameter-free mode-sensitive module in eval takes part in training.

A Dropout (or any sensitive module without parameters of its own) left in eval is frozen
on purpose when it sits in a frozen feature extractor: its input does not require grad
because everything before it is frozen. Only a forward can tell, so every grad-enabled
forward of a model with such modules is probed (``ProbeSession``), in every call of each
module (a shared module may sit behind a frozen layer once and a trained one next):

- its input required grad: gradients flow through it, so it is trained through;
- its input came from the model's own inputs through parameter-free modules only (an
  input-layer ``nn.Dropout`` after ``nn.Flatten``, or the input handed over as a keyword
  argument): nothing frozen lies before it, so it is part of what is trained, although
  the data never requires grad.

"Through parameter-free modules only" is told by one global forward pre-hook that notes
the first call of a module with parameters of its own in this model; the hook removes
itself there, so a deep model pays for it only up to its first layer. All of this runs
only in grad-enabled forwards of a model that has such modules in eval: never in the
ordinary training forward, never under ``no_grad``.
"""

from __future__ import annotations

import functools
from typing import Dict, List

import torch
from torch.nn.modules.module import register_module_forward_pre_hook

from .pickling import mark


#: The readings of a forward that could not be looked into: it ran compiled, or it ran
#: outside the model's own forward (its submodules called directly) and was learnt of
#: only at the step.
UNSEEN = {}


def _tensors(args, kwargs):
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
    if kwargs:
        for a in kwargs.values():
            if isinstance(a, torch.Tensor):
                yield a


def param_owners(root) -> frozenset:
    """ids of the modules of ``root`` with parameters of their own."""
    return frozenset(id(m) for m in root.modules() if any(p is not None for p in m._parameters.values()))


class ProbeSession:
    """The probes of one grad-enabled forward. ``readings`` maps a snapshot entry's index
    to ``[input required grad, fed from the model's inputs]``, OR-ed over its calls."""

    __slots__ = ("readings", "ran", "inputs", "owners", "handles", "_global")

    def __init__(self, snap, root, args, kwargs):
        self.readings: Dict[int, List[bool]] = {}
        self.ran = False  # a module with parameters of its own has been called
        self.inputs = {id(t) for t in _tensors(args, kwargs)}
        if snap.owners is None:
            snap.owners = param_owners(root)
        self.owners = snap.owners
        self.handles = []
        self._global = register_module_forward_pre_hook(self._module_called)
        for i, entry in snap.probed:
            m = entry.ref()
            if m is not None:
                self.handles.append(
                    m.register_forward_pre_hook(mark(functools.partial(self._probe, i)), with_kwargs=True))

    def _module_called(self, module, args):
        if id(module) in self.owners:
            self.ran = True
            self._global.remove()  # from here on every probed module is behind a layer

    def _probe(self, i, module, args, kwargs):
        if not torch.is_grad_enabled():
            return None
        r = self.readings.get(i)
        if r is None:
            r = self.readings[i] = [False, False]
        for t in _tensors(args, kwargs):
            if t.requires_grad:
                r[0] = True
            if not self.ran or id(t) in self.inputs:
                r[1] = True
        return None

    def finish(self) -> Dict[int, List[bool]]:
        self._global.remove()
        for h in self.handles:
            h.remove()
        self.handles = []
        return self.readings


def begin(st, root, args, kwargs) -> None:
    """Probe this forward of ``root`` (from its forward pre-hook, grad enabled)."""
    if st.probe_session is not None:
        st.probe_session.finish()  # the previous forward raised before its post-hook
    st.probe_session = ProbeSession(st.snapshot, root, args, kwargs)


def take(st):
    """The readings of the forward that just ended, or None if it was not probed."""
    session = st.probe_session
    if session is None:
        return None
    st.probe_session = None
    return session.finish()


def in_frozen_part(root, name: str) -> bool:
    """Does the module ``name`` sit in a frozen part of ``root``: is its nearest enclosing
    module with parameters (not the root) one whose parameters all have
    requires_grad=False? (An input-layer Dropout of a frozen backbone is the backbone's.)"""
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        try:
            part = root.get_submodule(".".join(parts[:k]))
        except AttributeError:
            return False
        seen = False
        for p in part.parameters():
            seen = True
            if p.requires_grad:
                return False
        if seen:
            return True
    return False
