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

from .observe import inputs, modes
from .observe.graph import ACTIVITY, ForwardRecord, PresumedForward
from .observe.modes import MODE_EPOCH, STRUCTURE_EPOCH
from .observe.snapshot import ModeSnapshot


class RootState:
    """Everything a guard tracks about one watched model. Holds the model weakly."""

    __slots__ = (
        "guard", "ref", "name", "epoch", "struct_epoch", "snapshot", "param_ids", "has_trainable", "grad_marks",
        "prev_forward_activity", "fwd_seq", "evidence", "presumed", "source", "trained",
        "countdown", "grads_persist", "polls_due", "rule_state", "sample_due", "eval_snapshots", "call_watch",
        "handles", "probing", "probe_session", "compiled", "active", "hooked", "pre_handle", "called_from",
        "__weakref__",
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
        # Whether .grad tensors live on across steps (None: not known yet). Training
        # forwards are presumed backpropagated only once it is known they do not (GradMark).
        self.grads_persist = None
        self.polls_due = guard.poll_interval  # steps with new gradients until the rules' next poll
        self.rule_state: dict = {}  # rule code -> that rule's own record for this model
        self.grad_marks: tuple = ()  # the GradMarks of the optimizers that train it
        # The next forward's pre-hook path samples the torch calls of an eval-mode forward
        # (observe/calls.py) when this is set: by a snapshot rebuild with the model in eval.
        self.sample_due = False
        self.eval_snapshots = 0   # eval-mode snapshots that reached a forward (for the sample's bound)
        self.call_watch = None    # observe.calls.CallWatch, during a sampled forward
        self.handles: list = []
        # Whether every grad-enabled forward is probed (the snapshot has parameter-free
        # sensitive modules in eval), and the probes of the forward under way.
        self.probing = False
        self.probe_session = None
        # Set when the model runs compiled (``_compiled.py``): it is then watched from
        # outside the compiled code, and nothing is hooked inside it.
        self.compiled = False
        self.active = True
        self.hooked = False      # True when the model carries our hooks (watch(), not auto)
        self.pre_handle = None   # the one-shot pre-hook, while armed
        # (code, line) of the user's function that calls the model's submodules rather
        # than the model (a LightningModule's training_step, told by the Lightning
        # callback): where a step's findings point when no forward of the model ran.
        self.called_from = None
        self.rescan(module)

    def rescan(self, module: nn.Module) -> None:
        """Slow path: a mode or the structure changed somewhere."""
        inputs.take(self)
        if self.struct_epoch != STRUCTURE_EPOCH[0] or not self.param_ids:
            self.param_ids = frozenset(id(p) for p in module.parameters())
        # Read again at every rescan: requires_grad flips have no hook.
        self.has_trainable = any(p.requires_grad for p in module.parameters())
        self.epoch, self.struct_epoch = MODE_EPOCH[0], STRUCTURE_EPOCH[0]
        guard = self.guard
        self.snapshot = ModeSnapshot(module, guard.config.frozen)
        self.snapshot.step_quiet = guard.step_quiet(self.snapshot)
        self.probing = bool(self.snapshot.probed) and not self.compiled
        self.sample_due = not self.snapshot.root_training and bool(guard.eval_call_rules) and not self.compiled

    def refresh_param_ids(self) -> None:
        m = self.ref()
        if m is not None:
            self.param_ids = frozenset(id(p) for p in m.parameters())

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
        inputs.take(self)
        for h in self.handles:
            h.remove()
        self.handles, self.snapshot, self.source = [], None, None
        self.grad_marks = ()
        self.presumed.snapshot = self.presumed.allowed = None
        self.rule_state.clear()

    def grads_unmoved(self) -> bool:
        """Certain that no backward reached this model since its optimizers' last steps?
        (False when no optimizer is known: then nothing is certain.)"""
        marks = self.grad_marks
        return bool(marks) and all(m.unmoved() for m in marks)

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


class GradMark:
    """Whether a backward reached a model's parameters since an optimizer's previous
    step, told at O(1) cost from the gradients themselves, with no autograd callback.

    Every backward into a parameter either creates its ``.grad`` (after
    ``zero_grad(set_to_none=True)``, the default) or adds to it in place, which moves the
    tensor's ``_version``. So a ``.grad`` that is None, or the same tensor at the same
    version as at the previous step, got no backward since; a new tensor or a moved
    version may have (``zero_grad(set_to_none=False)``, clipping and ``GradScaler``'s
    unscale also move the version: those count as "maybe", never as a finding).

    The ordinary step reads one parameter, the first small one the optimizer trains (the
    first layer sits below every head, so any backward through the model reaches it);
    only when it says "no backward" is a second one read, the last small one, so that a
    model whose first layer a step leaves out is not taken for one with no backward.
    The two gradients are held strongly between steps, so their identity is certain;
    "small" (at most ``SMALL`` elements, a bias or a norm's weight) keeps what that holds
    alive negligible.

    Only a program whose gradients are replaced at every step lets training forwards be
    presumed: where a gradient tensor lives on from step to step
    (``zero_grad(set_to_none=False)``, or no zero_grad at all), a moved version cannot
    tell a backward from a ``zero_()``. So ``RootState.grads_persist`` starts unknown
    (None) and every forward is followed into autograd, which is exact; the first step
    that sees the gradient replaced or cleared makes it False (presume from then on), one
    that sees it live on makes it True (follow for good, at the cost of one callback per
    backward for those programs only).
    """

    SMALL = 4096

    __slots__ = ("root", "params", "first", "last", "g_first", "v_first", "g_last", "v_last")

    def __init__(self, root, params, first, last):
        self.root = root
        self.params = params  # the optimizer's parameters of the model (it holds them too)
        self.first, self.last = first, last
        self.g_first = self.g_last = None
        self.v_first = self.v_last = -1

    @classmethod
    def over(cls, root, params: list) -> Optional["GradMark"]:
        """A mark over the parameters of ``params`` that require grad, or None if none does."""
        ends = cls._ends(params)
        return cls(root, params, *ends) if ends is not None else None

    @classmethod
    def _ends(cls, params: list):
        """The first and the last small parameter of ``params`` that require grad (of
        any size where none is small), or None if none requires grad."""
        live = [p for p in params if p.requires_grad]
        if not live:
            return None
        small = [p for p in live if p.numel() <= cls.SMALL] or live
        return small[0], small[-1]

    #: What ``moved()`` returns: a new gradient tensor (a backward made it), a moved
    #: version (a backward, or zero_()/clipping), or neither.
    NEW, VERSION, NONE = 2, 1, 0

    def moved(self) -> int:
        """Did a backward maybe reach the parameters since the last call (``NEW``,
        ``VERSION`` or ``NONE``, true when it maybe did)? Records what it read."""
        g = self.first.grad
        prev = self.g_first
        if g is not prev:
            self.g_first = g
            if prev is not None and self.root.grads_persist is None:
                self.root.grads_persist = False  # replaced or cleared: set_to_none
            if g is not None:
                self.v_first = g._version
                # The second parameter is read too, so that a later step that finds the
                # first untouched can tell about it (no zero_grad, no backward).
                h = self.last.grad
                self.g_last, self.v_last = h, (h._version if h is not None else -1)
                return 2
            return self._first_silent()
        if g is None:
            return self._first_silent()
        root = self.root
        if root.grads_persist is not True:
            root.grads_persist, root.countdown = True, 0
        v = g._version
        if v != self.v_first:
            self.v_first = v
            return 1
        return self._last_moved()

    def _first_silent(self) -> int:
        """No gradient on the first parameter: no backward reached it, or it was frozen
        since the mark was made (then it tells nothing any more: read others)."""
        if not self.first.requires_grad:
            return self._repick()
        return self._last_moved()

    def _none_or_repick(self) -> int:
        """Neither parameter read moved: no backward, unless one was frozen since."""
        if self.first.requires_grad and self.last.requires_grad:
            return 0
        return self._repick()

    def _repick(self) -> int:
        """A parameter read here was frozen since the mark was made, so it tells nothing:
        read two that still require grad. Their gradients have no record yet: one that is
        there may be new (maybe); none there means no backward since the last step."""
        ends = self._ends(self.params)
        if ends is None:
            return 0  # nothing left to train: no backward can have reached it
        self.first, self.last = ends
        g, h = self.first.grad, self.last.grad
        self.g_first, self.v_first = g, (g._version if g is not None else -1)
        self.g_last, self.v_last = h, (h._version if h is not None else -1)
        return 1 if g is not None or h is not None else 0

    def unmoved(self) -> bool:
        """Between steps, without recording: is it certain that no backward reached the
        first parameter since the last step? (A new tensor, or a moved version: maybe.)"""
        g = self.first.grad
        if g is None:
            return True
        return g is self.g_first and g._version == self.v_first

    def _last_moved(self) -> int:
        last = self.last
        if last is self.first:
            return self._none_or_repick()
        g = last.grad
        if g is None:
            self.g_last = None
            return self._none_or_repick()
        if g is not self.g_last:
            # Its record is only as old as the last suspicious step: maybe.
            self.g_last, self.v_last = g, g._version
            return 1
        v = g._version
        if v != self.v_last:
            self.v_last = v
            return 1
        return self._none_or_repick()


class OptimizerState:
    """A watched optimizer: its step hook, and what its previous step saw."""

    __slots__ = ("ref", "handles", "seen", "pairs", "_roots", "_ngroups", "_nfirst", "_struct", "_version", "__weakref__")

    def __init__(self, optimizer):
        self.ref = weakref.ref(optimizer)
        self.handles: list = []
        # RootState -> its ``evidence`` at this optimizer's previous step. A plain dict
        # (pruned with the roots): RootStates hold their models only weakly.
        self.seen: dict = {}
        # (RootState, its GradMark or None) for each root: the parameters of that model
        # this optimizer trains.
        self.pairs: list = []
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
            for st in list(guard.root_states()):
                st.refresh_param_ids()  # parameters may have been swapped in place (fully_shard)
            self._roots = [st for st in list(guard.root_states()) if st.active and not ids.isdisjoint(st.param_ids)]
            self._ngroups, self._nfirst = len(groups), nfirst
            self._struct, self._version = STRUCTURE_EPOCH[0], guard.roots_version
            self.seen = {st: n for st, n in self.seen.items() if st in self._roots}
            marks = {st: mark for st, mark in self.pairs if mark is not None}
            for st, old in marks.items():
                if st not in self._roots:  # a model this optimizer no longer trains
                    st.grad_marks = tuple(m for m in st.grad_marks if m is not old)
            pairs = []
            for st in self._roots:
                mark = GradMark.over(st, [p for g in groups for p in g["params"] if id(p) in st.param_ids])
                old = marks.get(st)
                if mark is not None and old is not None and old.first is mark.first and old.last is mark.last:
                    mark = old  # keep what it read at the previous step
                pairs.append((st, mark))
                if old is not None and old is not mark:
                    st.grad_marks = tuple(m for m in st.grad_marks if m is not old)
                if mark is not None and mark not in st.grad_marks:
                    st.grad_marks += (mark,)
                # A pair first seen now (optimizer watched after backwards, or found at its
                # first step in automatic mode): give the latest backward to this step.
                self.seen.setdefault(st, max(st.evidence - 1, 0))
            self.pairs = pairs
        return self._roots

    def release(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.seen.clear()
        self.pairs = []
        self._roots = []
