"""``watch()`` and the ``Guard``: the registry of watched models and optimizers, and the
face users hold (``violations``, ``report()``, ``mode_map()``, ``unwatch()``, ``with``).

What runs on every forward and step is in ``_hotpath.py``; what the guard keeps per model
and per optimizer in ``_state.py``; the checks in ``rules/``; dedupe and the on-violation
action in ``report/collect.py``. Automatic mode (``_auto.py``) adds its models through
the same ``watch_model`` call with ``hooks=False``: its ``__call__`` wrapper runs the
hooks itself.

A guard never outlives its purpose: unwatch() removes everything and cannot raise, and a
guard dropped without it (its models and optimizers gone) is freed like any object, its
share of the global patches released by a finaliser.
"""

from __future__ import annotations

import random
import warnings
import weakref
from typing import Iterable, List, Optional

import torch
import torch.nn as nn

from . import _compiled
from ._config import Config, Severity, resolve, split_frozen
from ._exceptions import ModeGuardWarning
from ._frames import Location, _is_framework, framework_caller, to_location, user_code_line, user_location
from ._hotpath import arm, drain_released, make_post_hook, make_step_pre_hook
from ._markers import ALLOWED
from ._state import OptimizerState, RootState
from .observe import modes, sensitivity
from .observe.calls import EVAL_SAMPLE_EVERY, EVAL_SAMPLE_FIRST
from .observe.graph import ACTIVITY, RELEASED, judge_live
from .observe.modes import PATCHES
from .observe.pickling import mark
from .report import ModeMap, Report, Violation
from .report.collect import ACTIONS, ViolationLog, stacklevel
from .report.modemap import build_mode_map
from .report.names import leaves
from .rules import RULES, rule_code
from .rules._base import overrides

_GUARDS: "weakref.WeakKeyDictionary[nn.Module, Guard]" = weakref.WeakKeyDictionary()

#: The settings watch() reads (MODEGUARD_FAIL_ON is for modeguard run and pytest).
_WATCH_SETTINGS = ("on_violation", "severities", "backward_sample")


def guard_of(module: nn.Module) -> Optional["Guard"]:
    """The active guard watching ``module`` as a root, if any."""
    g = _GUARDS.get(module)
    return g if g is not None and g.active else None


def _free(frozen_modules: "weakref.WeakSet", holds_patches: bool) -> None:
    """What a guard holds outside itself, given back by unwatch() or, for a guard
    dropped without it, by its finaliser (which must not refer to the guard)."""
    try:
        if len(frozen_modules):
            sensitivity.unmark_frozen(list(frozen_modules))
    finally:
        if holds_patches:
            PATCHES.release()


#: Where optimizer wrappers keep the optimizer they wrap: accelerate's AcceleratedOptimizer
#: and Lightning's LightningOptimizer (``.optimizer``, ``._optimizer``), and others.
_WRAPPED_OPTIMIZER_ATTRS = ("optimizer", "_optimizer", "optim")

_OPTIMIZER_EXPECTED = ("torch.optim.Optimizer objects (or wrappers that expose one as .optimizer, such as "
                       "accelerate's AcceleratedOptimizer and Lightning's LightningOptimizer)")


def unwrap_optimizer(obj, caller: str = "modeguard.watch()", after: str = ""):
    """The ``torch.optim.Optimizer`` that ``obj`` is or wraps: the innermost one, whose
    ``step()`` is the one that updates the parameters (a wrapper's ``step()`` calls it).
    ``TypeError`` saying what was expected for anything else, including a wrapper that
    subclasses Optimizer without initialising it (no step hooks of its own)."""
    o = obj
    for _ in range(8):  # wrappers of wrappers; a cycle ends here
        inner = None
        for attr in _WRAPPED_OPTIMIZER_ATTRS:
            try:
                cand = getattr(o, attr, None)
            except Exception:  # a property that raises is no wrapped optimizer
                cand = None
            if cand is not None and cand is not o and (isinstance(cand, torch.optim.Optimizer) or hasattr(cand, "param_groups")):
                inner = cand
                break
        if inner is None:
            break
        o = inner
    if isinstance(o, torch.optim.Optimizer) and isinstance(getattr(o, "_optimizer_step_pre_hooks", None), dict):
        return o
    raise TypeError(f"{caller} expects {_OPTIMIZER_EXPECTED}{after}, got {type(obj).__module__}.{type(obj).__name__}")


def settings_config(on_violation="warn", rules=None, frozen=None, backward_sample=None):
    """``watch()``'s arguments as a Config, and the modules among ``frozen``. The
    ``on_violation`` argument is the code's default, so ``MODEGUARD`` can switch a whole
    program (see ``_config``)."""
    patterns, modules = split_frozen(frozen)
    config = resolve(
        {"severities": rules, "backward_sample": backward_sample, "frozen": patterns},
        defaults={"on_violation": on_violation}, rule_code=rule_code, settings=_WATCH_SETTINGS,
    )
    return config, modules


class Guard:
    """Watches models and optimizers for train/eval mode mistakes.

    Made by :func:`modeguard.watch`. Use it as a context manager, or call
    :meth:`unwatch` to remove every hook and patch it installed.
    """

    def __init__(self, on_violation="warn", rules=None, frozen=None, backward_sample=None, *,
                 config: Optional[Config] = None):
        if config is None:
            config, frozen_modules = settings_config(on_violation, rules, frozen, backward_sample)
        else:
            patterns, frozen_modules = split_frozen(frozen)
            if patterns:
                config = config.replace(frozen=config.frozen + patterns)
        self.config = config
        self._roots: dict = {}      # id(module) -> RootState
        self.roots_version = 0      # moves when a root is added or forgotten
        self._opts: dict = {}       # id(optimizer) -> OptimizerState
        self._names: dict = {}      # model name -> next number for a name taken (O(1) naming)
        self._finalizers: list = []  # detached by unwatch(): nothing of ours outlives it
        self._log = ViolationLog()
        self._quiet = 0             # > 0 while draining from unwatch()/report(): never raise
        self._with_stack: List[bool] = []
        self._created_by_last_call = True
        # Set by the framework callbacks (modeguard.integrations): a finding at or above
        # this FailOn stops the program at once, ``on_fail(violation)`` having run first.
        self.fail_on = None
        self.on_fail = None
        self.steps = 0
        self._rng = random.Random(0x6D67)  # fixed seed: a rerun follows the same forwards
        # Training seen before this guard (an earlier guard in the same process) must not
        # count as this program's training: MG201 compares against this mark.
        self.activity_at_start = ACTIVITY[0]
        enabled = [r for code, r in RULES.items() if config.severities.get(code, r.severity) is not Severity.OFF]
        self.nograd_rules = [r for r in enabled if overrides(r, "on_nograd_forward")]
        self.release_rules = [r for r in enabled if overrides(r, "on_release")]
        self.step_rules = [r for r in enabled if overrides(r, "on_step")]
        self.poll_rules = [r for r in enabled if overrides(r, "on_poll")]
        self.report_rules = [r for r in enabled if overrides(r, "on_report")]
        self.poll_interval = min((r.poll_interval for r in self.poll_rules), default=1 << 30)
        # torch function -> the rules that look at its calls in sampled eval-mode forwards
        # (observe/calls.py); empty: no forward is ever sampled.
        self.eval_call_rules: dict = {}
        for r in enabled:
            if overrides(r, "on_eval_call"):
                for fn in r.eval_calls:
                    self.eval_call_rules[fn] = self.eval_call_rules.get(fn, ()) + (r,)
        # The sample's bound: every eval-mode snapshot of a model up to the first this many,
        # then one in this many (observe.calls.sample_due).
        self.eval_sample_first, self.eval_sample_every = EVAL_SAMPLE_FIRST, EVAL_SAMPLE_EVERY
        self._frozen_modules = weakref.WeakSet(frozen_modules)
        self._active = config.active
        if self._active:
            PATCHES.acquire()
            if frozen_modules:
                sensitivity.mark_frozen(frozen_modules)
        self._release = weakref.finalize(self, _free, self._frozen_modules, self.active)

    # ---- settings ---------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Watching: made with checking on, and not unwatched yet."""
        return self._active

    @property
    def backward_sample(self) -> Optional[int]:
        return self.config.backward_sample

    @property
    def rng(self) -> random.Random:
        return self._rng

    @property
    def frozen_patterns(self) -> tuple:
        return self.config.frozen

    # ---- watching ---------------------------------------------------------------------

    def watch_model(self, model: nn.Module, name: Optional[str] = None, *, hooks: bool = True) -> "Guard":
        """Watch ``model``. ``hooks=False`` registers it without hooks: the caller runs
        ``_hotpath``'s hooks itself (automatic mode's ``__call__`` wrapper)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"modeguard.watch() expects a torch.nn.Module, got {type(model).__module__}.{type(model).__name__}")
        model, wrapper = _compiled.unwrap(model)  # torch.compile(model): watch the model itself
        if not self.active or id(model) in self._roots:
            return self
        other = guard_of(model)
        if other is not None and other is not self:
            raise ValueError(f"{type(model).__name__} is already watched by another guard; use that guard, or unwatch() it first")
        st = RootState(self, model, self.unique_name(name or type(model).__name__))
        if hooks:
            st.handles = [model.register_forward_hook(mark(make_post_hook(self, st)))]
            st.hooked = True
            arm(st)
            modes.listen(self)
        self._roots[id(model)] = st
        self.roots_version += 1
        _GUARDS[model] = self
        self._finalizers.append(weakref.finalize(model, self._forget_root, id(model)))
        if wrapper is not None or model.__dict__.get("_compiled_call_impl") is not None:
            _compiled.go_outside(self, st, wrapper)
        return self

    def unique_name(self, base: str) -> str:
        """``base``, or ``base#2``, ``base#3`` ... when taken (constant time per name)."""
        k = self._names.get(base)
        if k is None:
            self._names[base] = 2
            return base
        while True:
            name = f"{base}#{k}"
            k += 1
            if name not in self._names:
                self._names[base] = k
                self._names[name] = 2
                return name

    def name_taken(self, name: str) -> bool:
        return name in self._names

    def watch_optimizer(self, optimizer, *, hooks: bool = True, check_params: bool = True) -> "Guard":
        """Watch ``optimizer`` (a ``torch.optim.Optimizer``, or a wrapper of one such as
        accelerate's ``AcceleratedOptimizer``: the optimizer it wraps is watched)."""
        optimizer = unwrap_optimizer(optimizer, "guard.watch_optimizer()")
        if not self.active or id(optimizer) in self._opts:
            return self
        ost = OptimizerState(optimizer)
        if check_params and self._roots and not ost.roots(self):
            # Warned before anything is registered: under -W error the call leaves nothing.
            warnings.warn(
                f"modeguard: the {type(optimizer).__name__} passed to watch() holds none of the watched "
                f"model's parameters, so its steps cannot be checked against that model's modes. "
                f"Pass the optimizer that trains this model.",
                ModeGuardWarning, stacklevel=stacklevel(),
            )
        if hooks:
            ost.handles = [optimizer.register_step_pre_hook(make_step_pre_hook(self, ost))]
        self._opts[id(optimizer)] = ost
        self._finalizers.append(weakref.finalize(optimizer, self._opts.pop, id(optimizer), None))
        return self

    def _forget_optimizer(self, optimizer) -> None:
        """Undo ``watch_optimizer`` (a ``watch()`` call that failed part-way)."""
        ost = self._opts.pop(id(optimizer), None)
        if ost is not None:
            ost.release()

    def root_states(self):
        return self._roots.values()

    def root_state(self, model: nn.Module) -> Optional[RootState]:
        return self._roots.get(id(model))

    def optimizer_state(self, optimizer) -> Optional[OptimizerState]:
        return self._opts.get(id(optimizer))

    @property
    def has_optimizers(self) -> bool:
        return bool(self._opts)

    def arm_roots(self) -> None:
        """A mode or the structure changed (called by ``observe.modes``)."""
        for st in list(self._roots.values()):  # list(): another thread may add a model
            if st.hooked:
                arm(st)

    def _forget_root(self, key) -> None:
        st = self._roots.pop(key, None)
        if st is not None:
            st.active = False
            self.roots_version += 1

    # ---- what the hot path and the rules call -----------------------------------------

    def step_quiet(self, snapshot) -> bool:
        """Slow path: is a step on gradients from ``snapshot`` quiet for every step rule?"""
        return all(rule.step_quiet(snapshot) for rule in self.step_rules)

    def poll(self, st: RootState, snapshot) -> None:
        """A model's poll is due (every ``poll_interval`` steps with new gradients): the
        rules that look periodically say when they want to look again."""
        st.polls_due = min(rule.on_poll(self, st, snapshot) for rule in self.poll_rules) if self.poll_rules else 1 << 30

    def emit(self, rule, severity, root, where, modules, mode_site, headline, allowed, *,
             kinds: Optional[dict] = None, forward_at=None) -> None:
        """Called by a rule that decided something is wrong. ``where`` is the user's line
        ((code, line) or a Location), or None for the innermost frame of the user's code
        now. ``forward_at``, for a finding at a step: the (code, line) that called the
        forward whose gradients the step applies; where a framework runs the step (Lightning
        calls ``optimizer.step`` from inside ``trainer.fit()``) and that line is the user's
        (their ``training_step``), it is the line reported, not the ``fit()`` call; a step the
        user called through a framework's wrapper, from that same function, keeps its line.
        ``kinds`` maps module names to their kind of mode-sensitivity."""
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
        elif forward_at is not None and not _is_framework(forward_at[0]) and framework_caller() is not None:
            # A step through a framework's optimizer wrapper (accelerate's), called from
            # the function that called the model, is the user's own step: its line.
            here = user_code_line(2)
            location = to_location(here if here is not None and here[0] is forward_at[0] else forward_at)
        else:
            location = user_location(2)
        # The modules that change behaviour themselves, not the containers above them.
        modules = leaves(modules)
        found_kinds = frozenset(kinds[n] for n in modules if n in kinds) if kinds else frozenset()
        v = self._log.add(rule, sev, root.name + _rank_suffix(), modules, location, mode_site, headline, self.steps,
                          found_kinds)
        if v is None:
            return
        action = ACTIONS[self.config.on_violation]
        if not self._quiet:
            action(rule, v)
            if self.fail_on is not None and self.fail_on.fails(v.severity):
                self._fail(rule, v)
            return
        try:
            action(rule, v)
        except Exception:  # unwatch() and report() never raise: the finding is recorded
            pass

    def _fail(self, rule, v: Violation) -> None:
        """``fail_on``: stop the program here (before the update, from a step hook)."""
        if self.on_fail is not None:
            self.on_fail(v)
        raise rule.Error(
            f"modeguard stopped training: a finding at or above fail_on={self.fail_on.value!r}.\n{v.message}", v)

    def _drain_quietly(self, judge_live_graphs: bool = False) -> None:
        if judge_live_graphs:
            judge_live(self)
        if not RELEASED and not (judge_live_graphs and self.report_rules):
            return
        self._quiet += 1
        try:
            drain_released()
            if judge_live_graphs:
                for rule in self.report_rules:
                    for st in list(self._roots.values()):
                        rule.on_report(self, st)
        except Exception:  # a rule failing here must not stop unwatch() or a report
            pass
        finally:
            self._quiet -= 1

    # ---- reading what was found --------------------------------------------------------

    @property
    def violations(self) -> List[Violation]:
        self._drain_quietly()
        return list(self._log)

    def report(self) -> Report:
        """What was found so far. Graphs still alive that no backward used count as
        unused now (``violations`` alone does not judge them: a program may still be
        about to backpropagate)."""
        self._drain_quietly(judge_live_graphs=True)
        return Report(list(self._log))

    def clear(self) -> None:
        """Forget the violations found so far (e.g. between notebook cells)."""
        self._log.clear()

    def mode_map(self, model: Optional[nn.Module] = None) -> ModeMap:
        if model is None:
            roots = self.models
            if not roots:
                raise ValueError("this guard watches no live model; pass one: guard.mode_map(model)")
            model = roots[0]
        elif not isinstance(model, nn.Module):
            raise TypeError(f"guard.mode_map() expects a torch.nn.Module (or nothing, for the first watched model), "
                            f"got {type(model).__module__}.{type(model).__name__}")
        return build_mode_map(model, self.frozen_patterns)

    @property
    def models(self) -> list:
        return [m for m in (st.ref() for st in list(self._roots.values())) if m is not None]

    # ---- lifecycle ---------------------------------------------------------------------

    def unwatch(self) -> None:
        """Remove every hook and patch this guard installed. Idempotent; never raises.
        Graphs freed unused before this call are still counted."""
        if not self.active:
            return
        try:
            self._drain_quietly(judge_live_graphs=True)
        finally:
            self._active = False
            for st in list(self._roots.values()):
                st.release()
                m = st.ref()
                if m is not None and _GUARDS.get(m) is self:
                    del _GUARDS[m]
            self._roots.clear()
            self.roots_version += 1
            for ost in list(self._opts.values()):
                ost.release()
            self._opts.clear()
            modes.unlisten(self)
            for fin in self._finalizers:
                fin.detach()
            self._finalizers.clear()
            self._with_stack.clear()
            self._release()  # the frozen marks and this guard's share of the global patches

    def __enter__(self) -> "Guard":
        # Only the with-block whose watch() call made this guard ends it: a nested
        # `with modeguard.watch(model, opt):` on a model already watched leaves it on.
        self._with_stack.append(self._created_by_last_call)
        self._created_by_last_call = True
        return self

    def __exit__(self, *exc) -> bool:
        owns = self._with_stack.pop() if self._with_stack else True
        if owns:
            self.unwatch()
        return False

    def __repr__(self) -> str:
        state = "active" if self.active else "inactive"
        names = ", ".join(st.name for st in list(self._roots.values()))
        return (f"<modeguard.Guard {state}: models=[{names}], optimizers={len(self._opts)}, "
                f"violations={len(self._log)}, {self.config!r}>")


def _rank_suffix() -> str:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return f" (rank {dist.get_rank()})"
    except Exception:  # pragma: no cover - distributed misconfigured: report without rank
        pass
    return ""


def watch(model: nn.Module, optimizer=None, *optimizers, on_violation: str = "warn", rules=None, frozen=None,
          backward_sample: Optional[int] = None) -> Guard:
    """Watch ``model`` (and optimizers) for train/eval mode mistakes.

    ``guard = modeguard.watch(model, optimizer)``. Watching an already watched model
    returns its guard (adding any new optimizers; other settings than it was watched
    with are ignored, with a warning). See the README for the options.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"modeguard.watch() expects a torch.nn.Module as its first argument, got {type(model).__module__}.{type(model).__name__}"
        )
    # Everything is checked before anything is installed, and a call that fails part-way
    # (a warning turned into an error) takes back what it added: all or nothing.
    opts = []
    for o in (optimizer, *optimizers):
        if o is not None:
            o = unwrap_optimizer(o, "modeguard.watch()", " after the model")
            if all(o is not seen for seen in opts):
                opts.append(o)
    config, frozen_modules = settings_config(on_violation, rules, frozen, backward_sample)
    existing = guard_of(model)
    if existing is not None:
        given = {"on_violation": on_violation != "warn", "rules": rules is not None,
                 "frozen": frozen is not None, "backward_sample": backward_sample is not None}
        _warn_if_settings_differ(existing, config, frozen_modules, given)
        guard = existing
    else:
        guard = Guard(config=config, frozen=list(frozen_modules))
    added = []
    try:
        guard.watch_model(model)
        for o in opts:
            if guard.optimizer_state(o) is None:
                guard.watch_optimizer(o)
                added.append(o)
    except BaseException:
        if existing is None:
            guard.unwatch()
        else:
            for o in added:
                guard._forget_optimizer(o)
        raise
    guard._created_by_last_call = existing is None
    return guard


def _warn_if_settings_differ(guard: Guard, config: Config, frozen_modules, given: dict) -> None:
    """Settings passed to this watch() call (``given``) that differ from the guard's."""
    mine = guard.config
    changed = [
        name for name, differs in (
            ("on_violation", config.on_violation is not mine.on_violation),
            ("rules", config.severities != mine.severities),
            ("frozen", config.frozen != mine.frozen or {id(m) for m in frozen_modules} != {id(m) for m in guard._frozen_modules}),
            ("backward_sample", config.backward_sample != mine.backward_sample),
        )
        if given[name] and differs
    ]
    if changed:
        listed = ", ".join(f"{c}=" for c in changed)
        warnings.warn(
            f"modeguard: this model is already watched, with other settings ({listed}); the new ones are "
            f"ignored. Call guard.unwatch() first to watch it with new settings.",
            ModeGuardWarning, stacklevel=stacklevel(),
        )
