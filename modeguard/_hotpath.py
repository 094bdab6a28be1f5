"""Everything modeguard runs on every forward and every optimizer step: the one file to
read for overhead.

- ``make_post_hook``: the forward hook of a watched model (called by the ``__call__``
  wrapper in automatic mode). Compares two epoch counters with the model's snapshot and,
  for the ordinary training forward (every mode-sensitive module in train mode, the first
  forward since the last backward or step), presumes it backpropagated: a few attribute
  writes, no allocation. Every other grad-enabled forward, and a random sample of the
  ordinary ones, is followed into autograd (``follow``); a no_grad forward goes to the
  rules that subscribe to it.
- ``make_pre_hook``/``arm``: a one-shot forward pre-hook, present only after a mode or
  structure change, that rebuilds the snapshot and places probes before the next forward,
  and, for a model in eval, has that forward's torch calls looked at (``observe/calls.py``).
- ``before_step``: the optimizer step pre-hook. Finds the models with new gradients and,
  in the same loop, whether every one of them comes from a snapshot that no step rule has
  anything to say about; then no rule is called.

What is slow (building a snapshot, a message, finding the user's line) happens in the
rules, in ``observe/`` and in ``report/``, only when a counter moved or a rule fired.
"""

from __future__ import annotations

import functools

import torch

from ._frames import user_code_line
from ._markers import ALLOWED
from .observe import calls
from .observe.graph import ACTIVITY, RELEASED, ForwardRecord, attach, output_grad_fns
from .observe.modes import MODE_EPOCH, STRUCTURE_EPOCH
from .observe.pickling import mark


def drain_released() -> None:
    """Hand graphs that were freed unused to their rules (called from hooks, never from
    the finaliser itself, so warnings and exceptions happen at a normal point)."""
    while RELEASED:
        rec = RELEASED.popleft()
        st = rec.root
        if st.active:
            guard = st.guard
            for rule in guard.release_rules:
                rule.on_release(guard, rec)


# ---- forwards ---------------------------------------------------------------------------

def arm(st) -> None:
    """A mode or the structure changed: before the next forward, rebuild the snapshot
    and install probes. The pre-hook exists only until then, because any forward
    pre-hook sends every call of the model down PyTorch's slower hook path."""
    if st.pre_handle is None and st.hooked and st.active:
        m = st.ref()
        if m is not None:
            st.pre_handle = m.register_forward_pre_hook(mark(make_pre_hook(st)), prepend=True)


def make_pre_hook(st):
    """Before a forward, only when armed (watch()) or on every outermost call (auto):
    catch up with mode changes, and place the probes that must see this forward."""

    def modeguard_forward_pre_hook(module, args):
        if MODE_EPOCH[0] != st.epoch or STRUCTURE_EPOCH[0] != st.struct_epoch:
            st.rescan(module)
        if st.probes_pending and torch.is_grad_enabled():
            install_probes(st, args)
        if not st.probes_pending and st.pre_handle is not None:
            st.disarm()
        if st.sample_due:
            calls.begin(st, module)  # MG202: this eval-mode forward's torch calls are looked at

    return modeguard_forward_pre_hook


def install_probes(st, root_args=()) -> None:
    """One-shot pre-hooks on parameter-free sensitive modules in eval, to learn in the
    next grad-enabled forward whether their input requires grad (frozen extractor).
    A module fed the model's own input (an input-layer Dropout) is never part of a
    frozen extractor, whatever the data's requires_grad."""
    st.probes_pending = False
    snap = st.snapshot
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

        h = m.register_forward_pre_hook(mark(probe))
        cell.append(h)
        st.probe_handles.append(h)


def make_post_hook(guard, st):
    nograd_rules = guard.nograd_rules
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
                follow(guard, st, snap, output, act)
        else:
            for rule in nograd_rules:
                rule.on_nograd_forward(guard, st, snap)
        st.prev_forward_activity = act

    return modeguard_forward_hook


def follow(guard, st, snap, output, act) -> None:
    """Tie this forward to its backward, or learn that its graph was freed unused."""
    nodes = output_grad_fns(output)
    if not nodes:
        return
    if snap.plain_train:
        n = guard.backward_sample
        st.countdown = guard.rng.randrange(2 * n - 1) if n > 1 else 0
    # The user's line is needed only if this forward may turn out to be evaluation:
    # eval mode, or no backward/step since the previous one.
    where = user_code_line(2) if (not snap.root_training or act == st.prev_forward_activity) else None
    attach(ForwardRecord(st, snap, where, ALLOWED.get(), st.fwd_seq), nodes, st.on_backward)


# ---- optimizer steps --------------------------------------------------------------------

def make_step_pre_hook(guard, ost):
    # A partial, not a closure: one Python frame less on every step.
    return functools.partial(before_step, guard, ost)


def before_step(guard, ost, optimizer, args, kwargs) -> None:
    """A step pre-hook's call, ``(optimizer, args, kwargs)``, for ``ost``."""
    if RELEASED:
        drain_released()
    roots = ost.roots(guard, optimizer)
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
        st.polls_due -= 1
        if st.polls_due <= 0:
            guard.poll(st, snap)  # rules that look every so many steps (MG301's re-read)
        if not snap.step_quiet:
            quiet = False
    if not fresh:
        quiet = False  # a step with no new gradients: MG602's to judge
    if not quiet:
        # Torch hands step hooks the wrapped call's full args: (optimizer, closure?, ...).
        if args and args[0] is optimizer:
            args = args[1:]
        has_closure = (bool(args) and args[0] is not None) or (bool(kwargs) and kwargs.get("closure") is not None)
        for rule in guard.step_rules:
            rule.on_step(guard, ost, fresh, roots, has_closure)
    # The step goes ahead (a rule that raises stops it before this point). Marking
    # here rather than in a post-hook saves a hook call per step; a closure's own
    # backward (LBFGS) then counts towards the next step, which MG602 skips anyway.
    for st in fresh:
        seen[st] = st.evidence
        st.trained = True
    guard.steps += 1
    ACTIVITY[0] += 1
