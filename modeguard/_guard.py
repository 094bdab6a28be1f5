"""The Guard: installs the hooks on watched models and optimizers, and turns what the
hooks observe into rule events.

Hot path (every forward and step): compare two epoch counters, read the cached
ModeSnapshot, call the few rules that subscribe to the event; each decides in O(1)
whether to look closer. An ordinary training forward (every mode-sensitive module in
train mode, one forward per step) is presumed to be backpropagated and costs a few
attribute writes; only forwards that can be wrong (eval or mixed modes, a second forward
with no backward or step in between) and a random sample of the ordinary ones are
followed into the autograd graph, which costs a Python callback inside backward.

Slow path (a mode changed, a rule fired): walk the model, build the message, find the
user's line. The automatic mode of ``modeguard run`` is this same
Guard with roots and optimizers added as they are discovered.
"""

from __future__ import annotations

import functools
import os
import random
import warnings
import weakref
from typing import Iterable, List, Optional, Sequence

import torch
import torch.nn as nn

from ._config import Config, OnViolation, Severity, parse_backward_sample, resolve, split_frozen
from ._exceptions import ModeGuardWarning
from ._frames import Location, to_location, user_code_line, user_location
from ._markers import ALLOWED
from .observe import modes, sensitivity
from .observe.graph import ACTIVITY, RELEASED, ForwardRecord, PresumedForward, attach, output_grad_fns
from .observe.modes import HOOK_MARK, MODE_EPOCH, STRUCTURE_EPOCH, PATCHES
from .observe import snapshot as snapshot_module
from .observe.snapshot import ModeSnapshot, walk_marked
from .report import ModeMap, Report, Violation
from .rules import RULES, rule_code
from .rules._base import overrides

_GUARDS: "weakref.WeakKeyDictionary[nn.Module, Guard]" = weakref.WeakKeyDictionary()



def guard_of(module: nn.Module) -> Optional["Guard"]:
    """The active guard watching ``module`` as a root, if any."""
    g = _GUARDS.get(module)
    return g if g is not None and g.active else None


def _mark(fn):
    setattr(fn, HOOK_MARK, True)
    return fn


def drain_released() -> None:
    """Hand graphs that were freed unused to their rules (called from hooks, never from
    the finaliser itself, so warnings and exceptions happen at a normal point)."""
    while RELEASED:
        rec = RELEASED.popleft()
        st = rec.root
        if st.active:
            for rule in st.guard._release_rules:
                rule.on_release(st.guard, rec)


class RootState:
    """Everything a guard tracks about one watched model. Holds the model weakly."""

    __slots__ = (
        "guard", "ref", "name", "epoch", "struct_epoch", "snapshot", "param_ids",
        "prev_forward_activity",
        "fwd_seq", "evidence", "presumed", "source", "trained", "countdown",
        "nograd_streak", "nograd_mark", "nograd_seq", "unused_streak", "unused_mark", "steps_since_refresh",
        "handles", "probe_handles", "probes_pending", "active", "hooked", "pre_handle", "__weakref__",
    )

    def __init__(self, guard: "Guard", module: nn.Module, name: str):
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
        self.nograd_streak = self.unused_streak = self.steps_since_refresh = 0
        self.nograd_mark = self.unused_mark = self.nograd_seq = -1
        self.handles: list = []
        self.probe_handles: list = []
        self.probes_pending = False
        self.active = True
        self.hooked = False      # True when the model carries our hooks (watch(), not auto)
        self.pre_handle = None   # the one-shot pre-hook, while armed
        self.rescan(module)

    def arm(self) -> None:
        """A mode or the structure changed: before the next forward, rebuild the snapshot
        and install probes. The pre-hook exists only until then, because any forward
        pre-hook sends every call of the model down PyTorch's slower hook path."""
        if self.pre_handle is None and self.hooked and self.active:
            m = self.ref()
            if m is not None:
                self.pre_handle = m.register_forward_pre_hook(
                    _mark(self.guard._make_pre_hook(self)), prepend=True
                )

    def disarm(self) -> None:
        if self.pre_handle is not None:
            self.pre_handle.remove()
            self.pre_handle = None

    def rescan(self, module: nn.Module) -> None:
        """Slow path: a mode or the structure changed somewhere."""
        for h in self.probe_handles:
            h.remove()
        self.probe_handles = []
        if self.struct_epoch != STRUCTURE_EPOCH[0] or not self.param_ids:
            self.param_ids = frozenset(id(p) for p in module.parameters())
        self.epoch, self.struct_epoch = MODE_EPOCH[0], STRUCTURE_EPOCH[0]
        self.snapshot = ModeSnapshot(module, self.guard.frozen_patterns)
        self.snapshot.step_quiet = self.guard.step_quiet(self.snapshot)
        self.probes_pending = bool(self.snapshot.needs_probe())

    def install_probes(self, root_args=()) -> None:
        """One-shot pre-hooks on parameter-free sensitive modules in eval, to learn in the
        next grad-enabled forward whether their input requires grad (frozen extractor).
        A module fed the model's own input (an input-layer Dropout) is never part of a
        frozen extractor, whatever the data's requires_grad."""
        self.probes_pending = False
        snap = self.snapshot
        inputs = {id(a) for a in root_args if isinstance(a, torch.Tensor)}
        for i, entry in snap.needs_probe():
            m = entry.ref()
            if m is None:
                continue
            cell: list = []

            def probe(mod, args, _i=i, _cell=cell, _snap=snap, _inputs=inputs):
                if torch.is_grad_enabled():
                    _snap.probe[_i] = any(
                        isinstance(a, torch.Tensor) and (a.requires_grad or id(a) in _inputs) for a in args
                    )
                    if _cell:
                        _cell[0].remove()

            h = m.register_forward_pre_hook(_mark(probe))
            cell.append(h)
            self.probe_handles.append(h)

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
    __slots__ = ("ref", "handles", "seen", "_roots", "_ngroups", "_nfirst", "_struct", "_version", "__weakref__")

    def __init__(self, optimizer):
        self.ref = weakref.ref(optimizer)
        self.handles: list = []
        # RootState -> its ``evidence`` at this optimizer's previous step. A plain dict
        # (pruned with the roots): RootStates hold their models only weakly.
        self.seen: dict = {}
        self._roots: list = []
        self._ngroups = self._nfirst = self._struct = self._version = -1

    def roots(self, guard: "Guard", optimizer=None) -> list:
        """The watched models this optimizer updates; recomputed only when its param
        groups, the model structure or the set of roots changed."""
        groups = (optimizer if optimizer is not None else self.ref()).param_groups
        # Cheap to compare every step: add_param_group() and structure changes move these.
        nfirst = len(groups[0]["params"]) if groups else 0
        if (len(groups) != self._ngroups or nfirst != self._nfirst
                or STRUCTURE_EPOCH[0] != self._struct or guard._roots_version != self._version):
            ids = {id(p) for g in groups for p in g["params"]}
            self._roots = [st for st in guard._roots.values() if st.active and not ids.isdisjoint(st.param_ids)]
            self._ngroups, self._nfirst = len(groups), nfirst
            self._struct, self._version = STRUCTURE_EPOCH[0], guard._roots_version
            self.seen = {st: n for st, n in self.seen.items() if st in self._roots}
            for st in self._roots:
                # A pair first seen now (optimizer watched after backwards, or found at its
                # first step in automatic mode): give the latest backward to this step.
                self.seen.setdefault(st, max(st.evidence - 1, 0))
        return self._roots


class Guard:
    """Watches models and optimizers for train/eval mode mistakes.

    Made by :func:`modeguard.watch`. Use it as a context manager, or call
    :meth:`unwatch` to remove every hook and patch it installed.
    """

    def __init__(self, on_violation="warn", rules=None, frozen=None, backward_sample=None):
        patterns, frozen_modules = split_frozen(frozen)
        self.config = resolve(
            {"severities": rules, "backward_sample": backward_sample, "frozen": patterns},
            defaults={"on_violation": on_violation}, rule_code=rule_code,
            settings=("on_violation", "severities", "backward_sample"),
        )
        self.frozen_patterns: tuple = self.config.frozen
        self._roots: dict = {}      # id(module) -> RootState
        self._roots_version = 0
        self._opts: dict = {}       # id(optimizer) -> OptimizerState
        self._finalizers: list = []  # detached by unwatch(): nothing of ours outlives it
        self._violations: List[Violation] = []
        self._by_key: dict = {}
        self.steps = 0
        self.backward_sample = self.config.backward_sample
        self._rng = random.Random(0x6D67)  # fixed seed: a rerun follows the same forwards
        # Training seen before this guard (an earlier guard in the same process) must not
        # count as this program's training: MG201 compares against this mark.
        self.activity_at_start = ACTIVITY[0]
        self.active = self.config.on_violation is not OnViolation.OFF
        enabled = [r for code, r in RULES.items() if self.config.severities.get(code, r.severity) is not Severity.OFF]
        self._nograd_rules = [r for r in enabled if overrides(r, "on_nograd_forward")]
        self._release_rules = [r for r in enabled if overrides(r, "on_release")]
        self._step_rules = [r for r in enabled if overrides(r, "on_step")]
        if self.active:
            PATCHES.acquire()
            modes.listen(self)
            if frozen_modules:
                sensitivity.mark_frozen(frozen_modules)
        self._frozen_modules = weakref.WeakSet(frozen_modules)

    # ---- watching ------------------------------------------------------------------

    def watch_model(self, model: nn.Module, name: Optional[str] = None) -> "Guard":
        if not isinstance(model, nn.Module):
            raise TypeError(f"modeguard.watch() expects a torch.nn.Module, got {type(model).__module__}.{type(model).__name__}")
        if not self.active or id(model) in self._roots:
            return self
        other = guard_of(model)
        if other is not None and other is not self:
            raise ValueError(f"{type(model).__name__} is already watched by another guard; use that guard, or unwatch() it first")
        if name is None:
            name = type(model).__name__
            taken = {st.name for st in self._roots.values()}
            k = 2
            while name in taken:
                name, k = f"{type(model).__name__}#{k}", k + 1
        st = RootState(self, model, name)
        st.handles = [model.register_forward_hook(_mark(self._make_post_hook(st)))]
        st.hooked = True
        st.arm()
        self._roots[id(model)] = st
        self._roots_version += 1
        _GUARDS[model] = self
        self._finalizers.append(weakref.finalize(model, self._forget_root, id(model)))
        return self

    def watch_optimizer(self, optimizer, _check_params: bool = True, _hooks: bool = True) -> "Guard":
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"modeguard expects a torch.optim.Optimizer, got {type(optimizer).__module__}.{type(optimizer).__name__}"
            )
        if not self.active or id(optimizer) in self._opts:
            return self
        ost = OptimizerState(optimizer)
        if _hooks:
            ost.handles = [optimizer.register_step_pre_hook(self._make_step_pre_hook(ost))]
        self._opts[id(optimizer)] = ost
        self._finalizers.append(weakref.finalize(optimizer, self._opts.pop, id(optimizer), None))
        if _check_params and self._roots and not ost.roots(self):
            warnings.warn(
                f"modeguard: the {type(optimizer).__name__} passed to watch() holds none of the watched "
                f"model's parameters, so its steps cannot be checked against that model's modes. "
                f"Pass the optimizer that trains this model.",
                ModeGuardWarning, stacklevel=_stacklevel(),
            )
        return self

    def arm_roots(self) -> None:
        for st in list(self._roots.values()):
            st.arm()

    def optimizer_state(self, optimizer) -> Optional[OptimizerState]:
        return self._opts.get(id(optimizer))

    def _forget_root(self, key) -> None:
        st = self._roots.pop(key, None)
        if st is not None:
            st.active = False
            self._roots_version += 1

    # ---- hooks (hot path) ---------------------------------------------------------------

    def _make_pre_hook(self, st: RootState):
        """Before a forward, only when armed (watch()) or on every outermost call (auto):
        catch up with mode changes, and place the probes that must see this forward."""

        def modeguard_forward_pre_hook(module, args):
            if MODE_EPOCH[0] != st.epoch or STRUCTURE_EPOCH[0] != st.struct_epoch:
                st.rescan(module)
            if st.probes_pending and torch.is_grad_enabled():
                st.install_probes(args)
            if not st.probes_pending and st.pre_handle is not None:
                st.disarm()

        return modeguard_forward_pre_hook

    def _make_post_hook(self, st: RootState):
        nograd_rules = self._nograd_rules
        guard = self
        presumed = st.presumed
        get_allowed = ALLOWED.get

        def modeguard_forward_hook(module, args, output):
            if RELEASED:
                drain_released()
            if MODE_EPOCH[0] != st.epoch or STRUCTURE_EPOCH[0] != st.struct_epoch:
                st.rescan(module)  # changed during the forward itself
            snap = st.snapshot
            act = ACTIVITY[0]
            if torch.is_grad_enabled():
                st.fwd_seq += 1
                if snap.plain_train and act != st.prev_forward_activity and st.countdown:
                    # The common case: the first training forward since the last backward
                    # or step. Presumed backpropagated; nothing is allocated.
                    st.countdown -= 1
                    presumed.snapshot, presumed.allowed, presumed.seq = snap, get_allowed(), st.fwd_seq
                    st.source = presumed
                    st.evidence += 1
                else:
                    guard._follow(st, snap, output, act)
            else:
                for rule in nograd_rules:
                    rule.on_nograd_forward(guard, st, snap)
            st.prev_forward_activity = act

        return modeguard_forward_hook

    def _follow(self, st: RootState, snap, output, act) -> None:
        """Tie this forward to its backward, or learn that its graph was freed unused."""
        nodes = output_grad_fns(output)
        if not nodes:
            return
        if snap.plain_train:
            st.countdown = self._rng.randrange(2 * self.backward_sample - 1) if self.backward_sample > 1 else 0
        # The user's line is needed only if this forward may turn out to be evaluation:
        # eval mode, or no backward/step since the previous one.
        where = user_code_line(2) if (not snap.root_training or act == st.prev_forward_activity) else None
        attach(ForwardRecord(st, snap, where, ALLOWED.get(), st.fwd_seq), nodes, st.on_backward)

    def _make_step_pre_hook(self, ost: OptimizerState):
        # A partial, not a closure: one Python frame less on every step.
        return functools.partial(self.before_step, ost)

    def step_quiet(self, snapshot) -> bool:
        """Slow path: is a step on gradients from ``snapshot`` quiet for every step rule?"""
        return all(rule.step_quiet(snapshot) for rule in self._step_rules)

    def before_step(self, ost: OptimizerState, optimizer, args, kwargs) -> None:
        """A step pre-hook's call, ``(optimizer, args, kwargs)``, for ``ost``."""
        if RELEASED:
            drain_released()
        roots = ost.roots(self, optimizer)
        seen = ost.seen
        # Models with new gradients since this optimizer's previous step (a backward seen,
        # or a training forward presumed backpropagated), in one pass with the test for the
        # common step: new gradients only from forwards whose snapshots no step rule has
        # anything to say about. Then no rule is called at all. (A loop, not a list
        # comprehension: that is a function call of its own on Python 3.11.)
        fresh = []
        quiet = True
        for st in roots:
            if seen.get(st) == st.evidence:
                continue
            fresh.append(st)
            src = st.source
            if src is None:
                quiet = False
                continue
            snap = src.snapshot
            st.steps_since_refresh += 1
            if st.steps_since_refresh >= snapshot_module.REFRESH_EVERY and snap.train_bn:
                self._refresh_frozen(st, snap)
            if not snap.step_quiet:
                quiet = False
        if not fresh:
            quiet = False  # a step with no new gradients: MG602's to judge
        if not quiet:
            # Torch hands step hooks the wrapped call's full args: (optimizer, closure?, ...).
            if args and args[0] is optimizer:
                args = args[1:]
            has_closure = (bool(args) and args[0] is not None) or (bool(kwargs) and kwargs.get("closure") is not None)
            for rule in self._step_rules:
                rule.on_step(self, ost, fresh, roots, has_closure)
        # The step goes ahead (a rule that raises stops it before this point). Marking
        # here rather than in a post-hook saves a hook call per step; a closure's own
        # backward (LBFGS) then counts towards the next step, which MG602 skips anyway.
        for st in fresh:
            seen[st] = st.evidence
            st.trained = True
        self.steps += 1
        ACTIVITY[0] += 1

    def _refresh_frozen(self, st: RootState, snap) -> None:
        """requires_grad flips have no hook: re-read those of the BatchNorm modules in
        train mode (what MG301 needs), at most once per len(train_bn) steps."""
        if st.steps_since_refresh < len(snap.train_bn):
            return
        st.steps_since_refresh = 0
        snap.refresh_frozen(snap.train_bn)
        snap.step_quiet = self.step_quiet(snap)

    # ---- reporting (slow path) ----------------------------------------------------------

    def emit(self, rule, severity, root, where, modules, mode_site, headline, allowed) -> None:
        """Called by a rule that decided something is wrong."""
        current = ALLOWED.get()
        if (allowed and rule.code in allowed) or (current and rule.code in current):
            return
        sev = self.config.severities.get(rule.code) or severity or rule.severity
        if sev is Severity.OFF:
            return
        if isinstance(where, tuple):
            location = to_location(where)
        elif isinstance(where, Location):
            location = where
        else:
            location = user_location(2)
        key = (rule.code, location.file if location else None, location.line if location else None)
        found = self._by_key.get(key)
        if found is not None:
            found.count += 1
            if sev <= found.severity:
                return
            # The same place got worse (some modules in eval, then the whole model): the
            # user must hear about the escalation, and "raise" must raise.
            found.severity, found.headline, found.modules = sev, headline, list(modules)
            self._act(rule, found)
            return
        model = root.name + _rank_suffix()
        v = Violation.build(rule, sev, model, modules, location, mode_site, headline, self.steps)
        self._by_key[key] = v
        self._violations.append(v)
        self._act(rule, v)

    def _act(self, rule, v: Violation) -> None:
        action = self.config.on_violation
        if action is OnViolation.RECORD:
            return
        if action is OnViolation.RAISE and v.severity >= Severity.WARNING:
            raise rule.Error(v.message, v)
        category = rule.Info if v.severity is Severity.INFO else rule.Warning
        w = category(v.message)
        w.violation = v
        if v.location is not None:
            # Our own dedupe already decided this is new; the module name lets users
            # filter by their module as with any warning.
            module = os.path.splitext(os.path.basename(v.location.file))[0]
            warnings.warn_explicit(w, category, v.location.file, v.location.line, module=module)
        else:
            warnings.warn(w, stacklevel=_stacklevel())

    @property
    def violations(self) -> List[Violation]:
        if RELEASED:
            drain_released()
        return list(self._violations)

    def report(self) -> Report:
        return Report(self.violations)

    def clear(self) -> None:
        """Forget the violations found so far (e.g. between notebook cells)."""
        self._violations.clear()
        self._by_key.clear()

    def mode_map(self, model: Optional[nn.Module] = None) -> ModeMap:
        if model is None:
            roots = [st.ref() for st in self._roots.values() if st.ref() is not None]
            if not roots:
                raise ValueError("this guard watches no live model; pass one: guard.mode_map(model)")
            model = roots[0]
        return build_mode_map(model, self.frozen_patterns)

    @property
    def models(self) -> list:
        return [m for m in (st.ref() for st in self._roots.values()) if m is not None]

    # ---- lifecycle -------------------------------------------------------------------

    def unwatch(self) -> None:
        """Remove every hook and patch this guard installed. Idempotent."""
        if not self.active:
            return
        self.active = False
        if RELEASED:
            drain_released()
        for st in self._roots.values():
            st.active = False
            st.disarm()
            for h in st.handles + st.probe_handles:
                h.remove()
            st.handles, st.probe_handles, st.snapshot, st.source = [], [], None, None
            st.presumed.snapshot = st.presumed.allowed = None
            m = st.ref()
            if m is not None and _GUARDS.get(m) is self:
                del _GUARDS[m]
        self._roots.clear()
        self._roots_version += 1
        for ost in self._opts.values():
            for h in ost.handles:
                h.remove()
        self._opts.clear()
        modes.unlisten(self)
        for fin in self._finalizers:
            fin.detach()
        self._finalizers.clear()
        if self._frozen_modules:
            sensitivity.unmark_frozen(list(self._frozen_modules))
        PATCHES.release()

    def __enter__(self) -> "Guard":
        return self

    def __exit__(self, *exc) -> bool:
        self.unwatch()
        return False

    def __repr__(self) -> str:
        state = "active" if self.active else "inactive"
        names = ", ".join(st.name for st in self._roots.values())
        return f"<modeguard.Guard {state}: models=[{names}], optimizers={len(self._opts)}, violations={len(self._violations)}, {self.config!r}>"


def _stacklevel() -> int:
    """warnings.warn stacklevel that lands on the first frame outside modeguard/torch."""
    import sys
    from ._frames import _is_internal

    # Level 1 is our caller (the frame that calls warnings.warn); count up to the user.
    f = sys._getframe(1)
    level = 1
    while f is not None and _is_internal(f.f_code):
        f = f.f_back
        level += 1
    return level


def _rank_suffix() -> str:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return f" (rank {dist.get_rank()})"
    except Exception:  # pragma: no cover - distributed misconfigured: report without rank
        pass
    return ""


def build_mode_map(model: nn.Module, frozen_patterns: Sequence[str] = ()) -> ModeMap:
    rows = []
    for name, m, marked in walk_marked(model, frozen_patterns):
        site = modes.last_set(m)
        rows.append({
            "name": name,
            "type": type(m).__name__,
            "training": m.training,
            "sensitive": sensitivity.classify(m),
            "frozen": marked or sensitivity.params_frozen(m, recurse=False) is True,
            "mode_set_at": site.describe() if site else None,
        })
    return ModeMap(type(model).__name__, rows)


def watch(model: nn.Module, optimizer=None, *optimizers, on_violation: str = "warn", rules=None, frozen=None,
          backward_sample: Optional[int] = None) -> Guard:
    """Watch ``model`` (and optimizers) for train/eval mode mistakes.

    ``guard = modeguard.watch(model, optimizer)``. Watching an already watched model
    returns its guard (adding any new optimizers). See the README for the options.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"modeguard.watch() expects a torch.nn.Module as its first argument, got {type(model).__module__}.{type(model).__name__}"
        )
    opts = [o for o in (optimizer, *optimizers) if o is not None]
    for o in opts:
        if not isinstance(o, torch.optim.Optimizer):
            raise TypeError(f"modeguard.watch() expects torch.optim.Optimizer objects after the model, got {type(o).__module__}.{type(o).__name__}")
    existing = guard_of(model)
    guard = existing if existing is not None else Guard(on_violation=on_violation, rules=rules, frozen=frozen,
                                                        backward_sample=backward_sample)
    guard.watch_model(model)
    for o in opts:
        guard.watch_optimizer(o)
    return guard
