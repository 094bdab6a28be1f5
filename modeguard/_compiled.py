"""Watching a ``torch.compile``d model from outside the compiled code.

Dynamo traces a compiled model's ``_call_impl``, hooks included, as if they were the
model's own code: modeguard's hooks would become part of the graph, dynamo would guard on
its counters (a recompile at every step) and ``fullgraph=True`` would fail on a hook that
removes itself. So once a watched model runs compiled, nothing of modeguard's is left
inside it, and its forwards are seen from outside, where the compiled code is called:

- ``torch.compile(model)`` returns an ``OptimizedModule`` whose own ``__call__`` is not
  compiled: the forward hook moves onto it;
- ``model.compile()`` sets ``model._compiled_call_impl``, which ``nn.Module.__call__``
  calls: it is wrapped (and put back at ``unwatch()``).

Either is noticed whichever comes first: ``watch()`` of a compiled model (or of a model
whose ``torch.compile`` wrapper exists), or compiling a watched one (the ``_orig_mod``
registration and ``nn.Module.compile`` go through ``observe/modes.py``). What cannot be
seen from outside is what happens inside a compiled forward: the inputs of a Dropout in
eval (MG101 then judges it by whether it sits in a frozen part, see
``rules/step_in_eval.py``) and MG202's torch calls.
"""

from __future__ import annotations

import sys
import weakref
from typing import Optional, Tuple

import torch.nn as nn

from .observe.pickling import mark


def optimized_module(module) -> Optional[nn.Module]:
    """The model ``torch.compile(model)`` wrapped, if ``module`` is such a wrapper."""
    if "torch._dynamo" not in sys.modules:
        return None  # nothing was ever compiled in this process
    from torch._dynamo.eval_frame import OptimizedModule

    if isinstance(module, OptimizedModule):
        inner = module.__dict__.get("_modules", {}).get("_orig_mod")
        return inner if isinstance(inner, nn.Module) else None
    return None


def unwrap(module: nn.Module) -> Tuple[nn.Module, Optional[nn.Module]]:
    """``(model, wrapper)``: the model to watch, and the ``OptimizedModule`` around it:
    ``module`` itself, or one made earlier by ``torch.compile(model)`` (the user watching
    the model they compiled before)."""
    inner = optimized_module(module)
    if inner is not None:
        return inner, module
    return module, wrapper_of(module)


def wrapper_of(model: nn.Module) -> Optional[nn.Module]:
    """An ``OptimizedModule`` made by ``torch.compile(model)`` before the model was
    watched, if one is alive. Slow (a walk of the referrers), and asked only at watch()
    time in a process that has compiled something."""
    if "torch._dynamo" not in sys.modules:
        return None
    import gc

    from torch._dynamo.eval_frame import OptimizedModule

    for holder in gc.get_referrers(model):
        if isinstance(holder, dict) and holder.get("_orig_mod") is model:
            for owner in gc.get_referrers(holder):
                if isinstance(owner, dict):
                    for wrapper in gc.get_referrers(owner):
                        if isinstance(wrapper, OptimizedModule) and optimized_module(wrapper) is model:
                            return wrapper
    return None


class _CallImplHandle:
    """Puts back a model's compiled ``_compiled_call_impl`` (``model.compile()``)."""

    def __init__(self, model: nn.Module, wrapper, compiled):
        self._model = weakref.ref(model)
        self._wrapper, self._compiled = wrapper, compiled

    def remove(self) -> None:
        m = self._model()
        if m is not None and m.__dict__.get("_compiled_call_impl") is self._wrapper:
            object.__setattr__(m, "_compiled_call_impl", self._compiled)


def go_outside(guard, st, wrapper: Optional[nn.Module] = None) -> None:
    """``st``'s model runs compiled: its hooks leave it, and its forwards are seen where
    the compiled code is called (``wrapper``, the OptimizedModule, or the model's own
    ``_compiled_call_impl``)."""
    from ._hotpath import make_post_hook

    model = st.ref()
    if model is None or not st.active:
        return
    if st.compiled and not st.hooked:
        return
    st.compiled = True
    st.epoch = -1  # rebuilt at the next forward: nothing to probe or sample inside
    if not st.hooked:
        return  # automatic mode: its __call__ wrapper already runs outside
    st.disarm()
    for h in st.handles:
        h.remove()
    if wrapper is not None:
        st.handles = [wrapper.register_forward_hook(mark(make_post_hook(guard, st)))]
        return
    post = make_post_hook(guard, st, caller_depth=3)  # called by the wrapper below
    compiled = model.__dict__.get("_compiled_call_impl")
    if compiled is None:
        st.handles = []
        return

    def modeguard_compiled_call(*args, **kwargs):
        output = compiled(*args, **kwargs)
        post(None, args, output)
        return output

    object.__setattr__(model, "_compiled_call_impl", modeguard_compiled_call)
    st.handles = [_CallImplHandle(model, modeguard_compiled_call, compiled)]


def _watched(model: nn.Module):
    from ._guard import guard_of

    guard = guard_of(model)
    if guard is None or not guard.active:
        return None, None
    return guard, guard.root_state(model)


def on_wrapped(wrapper: nn.Module, model: nn.Module) -> None:
    """``torch.compile(model)`` of a watched model made ``wrapper`` (from the module
    registration hook, as the OptimizedModule registers ``_orig_mod``)."""
    guard, st = _watched(model)
    # (Called before the wrapper stores the model: its type is what tells.)
    if st is not None and "torch._dynamo" in sys.modules:
        from torch._dynamo.eval_frame import OptimizedModule

        if isinstance(wrapper, OptimizedModule):
            go_outside(guard, st, wrapper)


def on_compiled_in_place(model: nn.Module) -> None:
    """``model.compile()`` of a watched model has set its ``_compiled_call_impl``."""
    guard, st = _watched(model)
    if st is not None and model.__dict__.get("_compiled_call_impl") is not None:
        go_outside(guard, st)  # (modeguard's own wrapper is set without __setattr__)
