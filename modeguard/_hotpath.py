"""Everything modeguard runs on every forward and every optimizer step: the one file to
read for overhead.

- ``make_post_hook``: the forward hook of a watched model (called by the ``__call__``
  wrapper in automatic mode). Compares two epoch counters with the model's snapshot and,
  for the ordinary training forward (every mode-sensitive module in train mode, the first
  forward since the last backward or step), presumes it backpropagated: a few attribute
  writes, no allocation. Every other grad-enabled forward, and a random sample of the
  ordinary ones, is followed into autograd (``follow``); a no_grad forward goes to the
  rules that subscribe to it.
- ``make_pre_hook``/``arm``: a forward pre-hook, present only after a mode or structure
  change, that rebuilds the snapshot before the next forward; it stays while the model
  has parameter-free sensitive modules in eval, to probe its grad-enabled forwards
  (``observe/inputs.py``), and, for a model in eval, has the next forward's torch calls
  looked at (``observe/calls.py``).
- ``before_step``: the optimizer step pre-hook. Finds the models with new gradients and,
  in the same loop, whether every one of them comes from a snapshot that no step rule has
  anything to say about; then no rule is called.

What is slow (building a snapshot, a message, finding the user's line) happens in the
rules, in ``observe/`` and in ``report/``, only when a counter moved or a rule fired.
"""

from __future__ import annotations

import functools
import sys

import torch

from ._frames import user_code_line
from ._tracing import _flags, _tracing, jit_tracing  # noqa: F401  (_auto imports them from here)
from ._markers import ALLOWED
from .observe import calls, inputs
from .observe.graph import ACTIVITY, PLAIN, RELEASED, ForwardRecord, attach, holds_no_graph, output_grad_fns
from .observe.modes import MODE_EPOCH, STRUCTURE_EPOCH
from .observe.pickling import mark


#: A countdown that never runs out: no ordinary training forward is followed.
_NEVER = 1 << 62

def drain_released() -> None:
    """Hand graphs that were freed unused to their rules (called from hooks, never from
    the finaliser itself, so warnings and exceptions happen at a normal point)."""
    while RELEASED:
        rec = RELEASED.popleft()
        guard = rec.root.guard
        # The guard, not the root: a model that died with its graph (at the end of a
        # test function) still had its graph built for nothing.
        if guard._active:
            for rule in guard.release_rules:
                rule.on_release(guard, rec)


# ---- forwards ---------------------------------------------------------------------------

def arm(st) -> None:
    """A mode or the structure changed: before the next forward, rebuild the snapshot.
    The pre-hook stays only while the snapshot has modules to probe (``observe/inputs.py``),
    because any forward pre-hook sends every call of the model down PyTorch's slower hook
    path; for the ordinary training model it is gone after one forward."""
    if st.pre_handle is None and st.hooked and st.active and not st.compiled:
        m = st.ref()
        if m is not None:
            st.pre_handle = m.register_forward_pre_hook(mark(make_pre_hook(st)), prepend=True, with_kwargs=True)


def make_pre_hook(st):
    """Before a forward, only when armed (watch()) or when the same test says so (auto):
    catch up with mode changes, and probe the grad-enabled forwards that need it."""

    def modeguard_forward_pre_hook(module, args, kwargs):
        if _tracing() or _flags._is_compiling_flag:
            return None  # traced by dynamo: stay out of the graph (see make_post_hook)
        if MODE_EPOCH[0] != st.epoch or STRUCTURE_EPOCH[0] != st.struct_epoch:
            st.rescan(st.ref())
        if st.probing:
            if torch.is_grad_enabled():
                inputs.begin(st, st.ref(), args, kwargs)
        elif st.pre_handle is not None:
            st.disarm()
        if st.sample_due:
            calls.begin(st, st.ref())  # MG202: this eval-mode forward's torch calls are looked at
        return None

    return modeguard_forward_pre_hook


def make_post_hook(guard, st, caller_depth: int = 4):
    """``caller_depth``: how far up the user's call is from the hook (4 for a forward hook:
    torch's _call_impl, its inner() and _wrapped_call_impl in between; 2 for automatic
    mode's wrapper). Where torch's frames differ the line found is torch's, and the one
    finding that needs it (a last forward never backpropagated) falls back to the
    report's line."""
    nograd_rules = guard.nograd_rules
    presumed = st.presumed
    get_allowed = ALLOWED.get
    getframe = sys._getframe

    def modeguard_forward_hook(module, args, output):
        if _tracing() or _flags._is_compiling_flag:
            # Dynamo is tracing the model (compiled inside something larger): a constant
            # here, so nothing of modeguard's becomes part of the graph or of its guards.
            # A compiled model itself is watched from outside (``_compiled.py``).
            return
        if RELEASED:
            drain_released()
        if MODE_EPOCH[0] != st.epoch or STRUCTURE_EPOCH[0] != st.struct_epoch:
            st.rescan(st.ref())  # changed during the forward itself
        snap = st.snapshot
        act = ACTIVITY[0]
        if torch.is_grad_enabled():
            st.fwd_seq += 1
            if (snap.plain_train and act != st.prev_forward_activity and st.countdown
                    and output.__class__ not in PLAIN):
                # The common case: the first training forward since the last backward
                # or step. Presumed backpropagated; nothing is allocated.
                st.countdown -= 1
                presumed.snapshot, presumed.allowed, presumed.seq, presumed.activity = snap, get_allowed(), st.fwd_seq, act
                f = getframe(caller_depth)
                presumed.code = f.f_code
                presumed.line = f.f_lineno
                st.source = presumed
                st.evidence += 1
            else:
                follow(guard, st, snap, output, act, caller_depth + 1)
        else:
            for rule in nograd_rules:
                rule.on_nograd_forward(guard, st, snap)
        st.prev_forward_activity = act

    return modeguard_forward_hook


def follow(guard, st, snap, output, act, caller_depth: int) -> None:
    """Tie this forward to its backward, or learn that its graph was freed unused.
    ``caller_depth``: how far up the model's caller is from here."""
    probe = inputs.take(st) if st.probe_session is not None else inputs.UNSEEN if st.compiled else None
    if jit_tracing():
        return  # torch.jit.trace running the model: exporting it, not evaluating
    nodes = output_grad_fns(output)
    if not nodes:
        if st.has_trainable and holds_no_graph(output):
            # `return loss.item()` with grad enabled: the forward built a graph, and it
            # is gone already, unused. Judged like a graph freed unused.
            RELEASED.append(ForwardRecord(st, snap, user_code_line(2), ALLOWED.get(), st.fwd_seq))
        return
    if snap.plain_train and st.grads_persist is False:
        n = guard.backward_sample
        st.countdown = _NEVER if n is None else guard.rng.randrange(2 * n - 1) if n > 1 else 0
    # The user's line is needed only if this forward may turn out to be evaluation:
    # eval mode, or no backward/step since the previous one.
    where = user_code_line(2) if (not snap.root_training or act == st.prev_forward_activity) else None
    rec = ForwardRecord(st, snap, where, ALLOWED.get(), st.fwd_seq, probe)
    f = sys._getframe(caller_depth)
    rec.called_at = (f.f_code, f.f_lineno)  # the line that called the model (see called_at)
    attach(rec, nodes, st.on_backward)


# ---- optimizer steps --------------------------------------------------------------------

def make_step_pre_hook(guard, ost):
    # A partial, not a closure: one Python frame less on every step.
    return functools.partial(before_step, guard, ost)


def before_step(guard, ost, optimizer, args, kwargs):
    """A step pre-hook's call, ``(optimizer, args, kwargs)``, for ``ost``. Returns new
    ``(args, kwargs)`` for a step with a closure (see ``_check_after_closure``)."""
    if _tracing() or _flags._is_compiling_flag:
        return None  # a compiled function that steps: dynamo traces this hook
    # Torch hands step hooks the wrapped call's full args: (optimizer, closure?, ...).
    if kwargs or len(args) > 1:
        checked = _check_after_closure(guard, ost, optimizer, args, kwargs)
        if checked is not None:
            return checked
    if RELEASED:
        drain_released()
    roots = ost.roots(guard, optimizer)
    seen = ost.seen
    # Models with new gradients since this optimizer's previous step (a backward seen,
    # or a training forward presumed backpropagated whose gradients did move), in one
    # pass with the test for the common step: new gradients only from forwards whose
    # snapshots no step rule has anything to say about. Then no rule is called at all.
    # (A loop, not a list comprehension: that is a function call of its own on 3.11.)
    fresh = []
    quiet = True
    moved_any = False
    for st, mark in ost.pairs:
        # Read on every step, so that the next step compares with this one.
        moved = mark.moved() if mark is not None else 0
        if moved == 2 or (moved and st.grads_persist is False):
            moved_any = True  # (where gradients live on, a version also moves on zero_())
        if seen.get(st) == st.evidence:
            # (Automatic mode makes a directly called submodule a model of its own.)
            if st.hooked and (moved == 2 or (moved and st.grads_persist is False)):
                # New gradients with no forward of the model: its submodules were called,
                # not the model itself. (Where gradients live on, a moved version may be
                # a zero_() as well as a backward: not enough to tell.)
                _unseen_forward(st)
            else:
                continue
        src = st.source
        if src is st.presumed and mark is not None and not moved:
            # The training forward presumed backpropagated was not: no gradient of the
            # model moved since the previous step (a skipped backward: MG602's).
            seen[st] = st.evidence
            quiet = False
            continue
        fresh.append(st)
        if src is None:
            quiet = False
            continue
        snap = src.snapshot
        st.polls_due -= 1
        if st.polls_due <= 0:
            guard.poll(st, snap)  # rules that look every so many steps (MG301's re-read)
        if not snap.step_quiet:
            quiet = False
    if not fresh:
        quiet = False  # a step with no new gradients: MG602's to judge
    if not quiet:
        for rule in guard.step_rules:
            rule.on_step(guard, ost, fresh, roots, moved_any)
    # The step goes ahead (a rule that raises stops it before this point). Marking
    # here rather than in a post-hook saves a hook call per step.
    for st in fresh:
        seen[st] = st.evidence
        st.trained = True
    guard.steps += 1
    ACTIVITY[0] += 1


def _unseen_forward(st) -> None:
    """Gradients reached the model, but no forward of it was seen since the previous
    step: its submodules were called directly (a LightningModule's ``training_step``
    calling ``self.net(x)``). Slow path: the step applies gradients from forwards run in
    the modes the model has now, which is what the rules are given."""
    m = st.ref()
    if m is None:
        return
    if MODE_EPOCH[0] != st.epoch or STRUCTURE_EPOCH[0] != st.struct_epoch:
        st.rescan(m)
    st.fwd_seq += 1
    st.source = rec = ForwardRecord(st, st.snapshot, None, ALLOWED.get(), st.fwd_seq, inputs.UNSEEN)
    rec.called_at = st.called_from
    st.evidence += 1


def _check_after_closure(guard, ost, optimizer, args, kwargs):
    """``optimizer.step(closure)`` (LBFGS, and every step under PyTorch Lightning): the
    closure runs the forward and the backward inside ``step()``, after this hook. So the
    step is checked when the closure first returns, which is still before the update:
    a finding can stop it, and a closure that ran no backward is MG602's. Returns the
    arguments with the closure wrapped, or None when there is no closure."""
    rest = args[1:] if args and args[0] is optimizer else args
    if "closure" in kwargs:
        closure = kwargs["closure"]
    elif rest:
        closure = rest[0]
    else:
        return None
    if closure is None:
        return None
    checked: list = []

    # No functools.wraps: Lightning's closure is an object without __name__ or __doc__,
    # and copying them would raise and catch an AttributeError apiece at every step.
    def closure_then_check(*a, **k):
        out = closure(*a, **k)
        if not checked:  # LBFGS calls it again within the same step
            checked.append(True)
            before_step(guard, ost, optimizer, (optimizer,), {})
        return out

    if "closure" in kwargs:
        return args, dict(kwargs, closure=closure_then_check)
    return (optimizer, closure_then_check, *rest[1:]), kwargs
