"""Seeing the torch functions a watched model calls during a sampled eval-mode forward.

Some mode bugs live in code that no mode flag reaches: ``F.dropout(x, p)`` with its
``training`` left at the default, ``scaled_dot_product_attention(..., dropout_p=self.p)``,
an ``nn.Dropout`` built inside ``forward``. Only the calls themselves show them, and
seeing every call costs a Python call per tensor operation, so it is paid on a sample:
the first eval-mode forward of a model after each snapshot rebuild (a mode or structure
change), and, for a model whose snapshots keep changing, one rebuild in
``EVAL_SAMPLE_EVERY`` after the first ``EVAL_SAMPLE_FIRST``. Training forwards are never
sampled, and an evaluation that runs on with unchanged modes pays once.

The sample is a ``torch.overrides.TorchFunctionMode`` pushed by the forward pre-hook path
(``_hotpath.make_pre_hook``, which runs only after a change) and popped by a one-shot
forward hook registered with ``always_call=True``, so a forward that raises pops it too.
The mode hands the functions rules asked for (``Rule.eval_calls``) to those rules and
calls every function unchanged: outputs, graphs and random numbers are the unwatched
ones. It is never pushed while torch.compile or torch.jit traces, and it keeps to the
mode stack's order: if a mode the user pushed during the forward is still above it, it
turns itself into a pass-through and leaves the stack until it can pop itself.
"""

from __future__ import annotations

import sys
import threading

import torch
from torch.overrides import TorchFunctionMode

from .pickling import mark

#: Every eval-mode snapshot of a model up to this many is sampled (its first forward) ...
EVAL_SAMPLE_FIRST = 16
#: ... and after that one in this many: a model whose modes or structure change on every
#: forward (eval() and train() around each action of an RL policy, a module built inside
#: forward) would otherwise pay the sample on every evaluation.
EVAL_SAMPLE_EVERY = 16

_CALL_IMPL_CODE = torch.nn.Module._call_impl.__code__


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # torch < 2.3
        return torch._dynamo.is_compiling()


def _compiled(module) -> bool:
    """A torch.compile'd module: the mode would be part of what dynamo guards and traces."""
    return getattr(module, "_compiled_call_impl", None) is not None or hasattr(module, "_orig_mod")


def sample_due(st) -> bool:
    """Slow path, before an eval-mode forward whose snapshot was just rebuilt: sample it?
    Consumes ``st.sample_due``; counts the model's eval-mode snapshots."""
    st.sample_due = False
    st.eval_snapshots += 1
    n = st.eval_snapshots
    guard = st.guard
    return n <= guard.eval_sample_first or n % guard.eval_sample_every == 0


#: torch's modules with a native inference fast path that any torch function mode turns
#: off: the forward would run other kernels and give other last bits.
_FAST_PATH = (torch.nn.TransformerEncoder, torch.nn.TransformerEncoderLayer, torch.nn.MultiheadAttention)


def _may_take_a_fast_path(module) -> bool:
    """Could this forward of ``module`` run one of torch's fast paths? They need autograd
    off, or no parameter that requires grad (slow path: once per sampled forward)."""
    if torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
        return False
    return any(isinstance(m, _FAST_PATH) for m in module.modules())


def begin(st, module) -> None:
    """Push the call watch for this forward of ``module`` (the watched model ``st``). Not
    where the mode could change the forward's numerics (``_may_take_a_fast_path``)."""
    if _compiling() or torch._C._get_tracing_state() or not sample_due(st) or _compiled(module):
        return
    if _may_take_a_fast_path(module):
        return
    old = st.call_watch
    if old is not None:
        old.finish()  # left over from a forward interrupted by KeyboardInterrupt
    watch = CallWatch(st, module)
    watch.handle = module.register_forward_hook(mark(_end_hook(watch)), prepend=True, always_call=True)
    try:
        watch.__enter__()
    except BaseException:
        watch.handle.remove()
        raise
    st.call_watch = watch


def _end_hook(watch):
    def modeguard_call_watch_end(module, args, output):
        # A one-shot forward hook with always_call: when the forward raised, torch calls it
        # from the except clause of _call_impl itself.
        watch.finish(in_raise_path=sys._getframe(1).f_code is _CALL_IMPL_CODE and sys.exc_info()[0] is not None)

    return modeguard_call_watch_end


def _is_top(mode) -> bool:
    n = torch._C._len_torch_function_stack()
    return n > 0 and torch.overrides._get_function_stack_at(n - 1) is mode


class CallWatch(TorchFunctionMode):
    """The torch function mode of one sampled forward of one watched model."""

    def __init__(self, st, module):
        super().__init__()
        self.st = st
        self.guard = st.guard
        self.table = st.guard.eval_call_rules  # function -> the rules that asked for it
        self.live = True                 # False once the forward ended: a pass-through
        self.pushed = False
        self.thread = threading.get_ident()
        self.handle = None
        self.module_ids = None           # ids of the model's modules, built on first need

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        if self.live:
            rules = self.table.get(func)
            if rules is not None and not _compiling():
                for rule in rules:
                    rule.on_eval_call(self.guard, self.st, self, func, args, kwargs)
        return func(*args, **kwargs)

    def __enter__(self):
        super().__enter__()
        self.pushed = True
        return self

    def registered(self, module) -> bool:
        """Slow path: is ``module`` the watched model or one of its registered submodules?"""
        if self.module_ids is None:
            model = self.st.ref()
            self.module_ids = frozenset(id(m) for m in model.modules()) if model is not None else frozenset()
        return id(module) in self.module_ids

    def model_frame(self, frame):
        """Slow path: the innermost frame, from ``frame`` outwards, of a method of one of the
        model's modules (``self`` bound to it) and that module; ``(None, None)`` when the
        model is not on the stack at all (a mode left behind after its forward)."""
        model = self.st.ref()
        f = frame
        while f is not None:
            code = f.f_code
            if code.co_argcount and code.co_varnames[0] == "self":
                obj = f.f_locals.get("self")
                if obj is model or (isinstance(obj, torch.nn.Module) and self.registered(obj)):
                    return f, obj
            f = f.f_back
        return None, None

    def finish(self, in_raise_path: bool = False) -> None:
        """End the sample: stop looking, pop the mode if it is on top of this thread's
        stack, and remove the one-shot hook where that is safe."""
        if threading.get_ident() != self.thread:
            return  # another thread's forward of the same model: not our stack
        self.live = False
        if self.pushed and _is_top(self):
            self.__exit__(None, None, None)
            self.pushed = False
        if self.st.call_watch is self and not self.pushed:
            self.st.call_watch = None
        # Torch runs always_call hooks for a forward that raised by iterating the hook dict
        # itself, so removing the hook from inside that loop would raise; it is removed by
        # its next call (the model's next forward) or by the next sample instead. It stays
        # too while the mode is still on the stack, so that its next call can pop it.
        if self.handle is not None and not self.pushed and not in_raise_path:
            self.handle.remove()
            self.handle = None
