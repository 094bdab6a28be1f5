"""What a guard keeps about each watched model and each watched optimizer.

Plain slotted records, read and written by the hot path (``_hotpath.py``) and the guard
(``_guard.py``). Nothing in here belongs to a rule: a rule that needs memory per model
keeps it in ``RootState.rule_state`` under its own code, and a rule that needs to look at
a model every so many steps asks for it through ``polls_due`` (see ``Rule.on_poll``).
Models and optimizers are held by weak reference only.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch.nn as nn

from .observe import modes
from .observe.graph import ACTIVITY, ForwardRecord, PresumedForward
from .observe.modes import MODE_EPOCH, STRUCTURE_EPOCH
from .observe.snapshot import ModeSnapshot


class RootState:
    """Everything a guard tracks about one watched model. Holds the model weakly."""

    __slots__ = (
        "guard", "ref", "name", "epoch", "struct_epoch", "snapshot", "param_ids",
        "prev_forward_activity", "fwd_seq", "evidence", "presumed", "source", "trained",
        "countdown", "polls_due", "rule_state", "sample_due", "eval_snapshots", "call_watch",
        "handles", "probe_handles", "probes_pending", "active", "hooked", "pre_handle", "__weakref__",
    )

    def __init__(self, guard, module: nn.Module, name: str):
        self.guard = guard
        self.ref = weakref.ref(module)
        self.name = name
        self.epoch = self.struct_epoch = -1
        self.snapshot: Optional[ModeSnapshot] = None
        self.param_ids = frozenset()
        self.prev_forward_activity = -1
        self.fwd_seq = 0          # grad-enabled forwards so far
        # Backwards seen plus training forwards presumed backpropagated: an optimizer
        # step compares it with its value at the previous step (OptimizerState.seen).
        self.evidence = 0
        self.presumed = PresumedForward()
        # The forward whose gradients a step would now apply: the later of the last
        # forward seen backpropagated and the last presumed one (a ForwardRecord or the
        # PresumedForward; both have ``snapshot``, ``allowed`` and ``seq``), or None.
        self.source = None
        self.trained = False      # a backward or an optimizer step reached this model
        self.countdown = 0        # ordinary forwards left before the next followed one
        self.polls_due = guard.poll_interval  # steps with new gradients until the rules' next poll
        self.rule_state: dict = {}  # rule code -> that rule's own record for this model
        # The next forward's pre-hook path samples the torch calls of an eval-mode forward
        # (observe/calls.py) when this is set: by a snapshot rebuild with the model in eval.
        self.sample_due = False
        self.eval_snapshots = 0   # eval-mode snapshots that reached a forward (for the sample's bound)
        self.call_watch = None    # observe.calls.CallWatch, during a sampled forward
        self.handles: list = []
        self.probe_handles: list = []
        self.probes_pending = False
        self.active = True
        self.hooked = False      # True when the model carries our hooks (watch(), not auto)
        self.pre_handle = None   # the one-shot pre-hook, while armed
        self.rescan(module)

    def rescan(self, module: nn.Module) -> None:
        """Slow path: a mode or the structure changed somewhere."""
        for h in self.probe_handles:
            h.remove()
        self.probe_handles = []
        if self.struct_epoch != STRUCTURE_EPOCH[0] or not self.param_ids:
            self.param_ids = frozenset(id(p) for p in module.parameters())
        self.epoch, self.struct_epoch = MODE_EPOCH[0], STRUCTURE_EPOCH[0]
        guard = self.guard
        self.snapshot = ModeSnapshot(module, guard.config.frozen)
        self.snapshot.step_quiet = guard.step_quiet(self.snapshot)
        self.probes_pending = bool(self.snapshot.needs_probe())
        self.sample_due = not self.snapshot.root_training and bool(guard.eval_call_rules)

    def disarm(self) -> None:
        if self.pre_handle is not None:
            self.pre_handle.remove()
            self.pre_handle = None

    def release(self) -> None:
        """Remove every hook on the model and drop what refers to its graphs (unwatch)."""
        self.active = False
        self.disarm()
        if self.call_watch is not None:
            self.call_watch.finish()
        for h in self.handles + self.probe_handles:
            h.remove()
        self.handles, self.probe_handles, self.snapshot, self.source = [], [], None, None
        self.presumed.snapshot = self.presumed.allowed = None
        self.rule_state.clear()

    def on_backward(self, record: ForwardRecord) -> None:
        self.evidence += 1
        self.trained = True
        if record.seq > self.presumed.seq:
            self.source = record
        ACTIVITY[0] += 1

    def root_site(self):
        m = self.ref()
        return modes.last_set(m) if m is not None else None

    def __repr__(self) -> str:
        return f"<RootState {self.name}>"


class OptimizerState:
    """A watched optimizer: its step hook, and what its previous step saw."""

    __slots__ = ("ref", "handles", "seen", "_roots", "_ngroups", "_nfirst", "_struct", "_version", "__weakref__")

    def __init__(self, optimizer):
        self.ref = weakref.ref(optimizer)
        self.handles: list = []
        # RootState -> its ``evidence`` at this optimizer's previous step. A plain dict
        # (pruned with the roots): RootStates hold their models only weakly.
        self.seen: dict = {}
        self._roots: list = []
        self._ngroups = self._nfirst = self._struct = self._version = -1

    def roots(self, guard, optimizer=None) -> list:
        """The watched models this optimizer updates; recomputed only when its param
        groups, the model structure or the set of roots changed."""
        groups = (optimizer if optimizer is not None else self.ref()).param_groups
        # Cheap to compare every step: add_param_group() and structure changes move these.
        nfirst = len(groups[0]["params"]) if groups else 0
        if (len(groups) != self._ngroups or nfirst != self._nfirst
                or STRUCTURE_EPOCH[0] != self._struct or guard.roots_version != self._version):
            ids = {id(p) for g in groups for p in g["params"]}
            # list(): another thread may be adding a model (automatic mode).
            self._roots = [st for st in list(guard.root_states()) if st.active and not ids.isdisjoint(st.param_ids)]
            self._ngroups, self._nfirst = len(groups), nfirst
            self._struct, self._version = STRUCTURE_EPOCH[0], guard.roots_version
            self.seen = {st: n for st, n in self.seen.items() if st in self._roots}
            for st in self._roots:
                # A pair first seen now (optimizer watched after backwards, or found at its
                # first step in automatic mode): give the latest backward to this step.
                self.seen.setdefault(st, max(st.evidence - 1, 0))
        return self._roots

    def release(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.seen.clear()
        self._roots = []
