"""Where and when modes change.

The hot path must know in O(1) whether any module's mode changed since it last looked.
Every mode change stores the ``training`` flag (``train()``, ``eval()`` and direct
assignment alike), so a restorable setter for that one name, ``TrainingFlag`` on
``nn.Module``, bumps ``MODE_EPOCH`` and records the user's line, while assignments of
every other attribute run none of modeguard's code. A patch on ``nn.Module.train``
remembers the outermost call, so one ``model.eval()`` over a thousand modules costs one
stack walk, and recognises a model's own ``train()`` override that puts children back in
eval (mmdetection's ``norm_eval``): those are intentional. Torch has no hook for either;
module and parameter registration do have global hooks, which bump ``STRUCTURE_EPOCH`` (a
parameter assigned again under the same name does not: FSDP2 does that at every forward).
The same install adds pickling's hook stripping (``pickling.py``). All of it goes through
``_patches.SharedPatches``: installed with the first active guard, removed with the last.
"""

from __future__ import annotations

import functools
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Optional

import torch.nn as nn
import wrapt

from .._frames import Location, framework_caller, user_frame, user_location, _is_internal
from .._patches import Patches, SharedPatches
from .._tracing import _flags, _tracing
from . import pickling

#: Bumped on every change of any module's ``training`` flag (and on frozen() marks).
MODE_EPOCH = [0]
#: Bumped when a submodule or parameter is registered anywhere.
STRUCTURE_EPOCH = [0]

HOOK_MARK = pickling.HOOK_MARK  # kept importable here for existing callers


@dataclass(frozen=True)
class ModeSite:
    """Where a module's mode was last set, and how."""

    training: bool
    how: str  # "Net.train()", "Net.eval()", "assignment" or "override"
    location: Optional[Location]
    by: Optional[str] = None  # the class whose train() override set it, for "override"
    # The framework function that called train()/eval() (``Trainer.training_step
    # (transformers)``), when the user's code did not; location is then the user's call
    # into the framework.
    framework: Optional[str] = None

    def describe(self) -> str:
        where = str(self.location) if self.location else "an unknown place"
        if self.how == "override":
            return f"set to {'train' if self.training else 'eval'} by {self.by}.train() (an override), called from {where}"
        if self.how == "assignment":
            return f"`.training = {self.training}` assigned directly at {where}"
        if self.framework:
            return f"{self.how} by {self.framework}, inside the call at {where}"
        return f"{self.how} at {where}"

    def to_dict(self) -> dict:
        return {
            "training": self.training,
            "how": self.how,
            "by": self.by,
            "framework": self.framework,
            "location": self.location.to_dict() if self.location else None,
        }


_sites: "weakref.WeakKeyDictionary[nn.Module, ModeSite]" = weakref.WeakKeyDictionary()
#: The last site the user's own code (not a framework) set, per module.
_user_sites: "weakref.WeakKeyDictionary[nn.Module, ModeSite]" = weakref.WeakKeyDictionary()
_local = threading.local()


def last_set(module: nn.Module) -> Optional[ModeSite]:
    """Where ``module``'s mode was last changed while modeguard was active."""
    return _sites.get(module)


#: id(guard) -> weak reference to a guard whose roots carry a one-shot pre-hook to arm
#: after either epoch moves. Weak, so a guard dropped without unwatch() is freed and
#: never slows down mode changes; a dict of refs, so that another thread adding a guard
#: while this one iterates cannot break the user's train()/eval().
ON_EPOCH: dict = {}


def _epoch_moved() -> None:
    if ON_EPOCH:
        for ref in tuple(ON_EPOCH.values()):
            guard = ref()
            if guard is not None:
                guard.arm_roots()


def listen(guard) -> None:
    """Call ``guard.arm_roots()`` after every mode or structure change, while it lives."""
    key = id(guard)
    ON_EPOCH[key] = weakref.ref(guard, lambda _r, key=key: ON_EPOCH.pop(key, None))


def unlisten(guard) -> None:
    ON_EPOCH.pop(id(guard), None)


def bump_mode_epoch() -> None:
    MODE_EPOCH[0] += 1
    _epoch_moved()


def _train_stack() -> list:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def _patched_train(original):
    """``nn.Module.train`` that remembers the calls in progress (outermost first), for
    ``_note_training``. A plain function, not a wrapt wrapper: the Hugging Face Trainer
    calls ``model.train()`` at every step, once per module of the model, and a wrapt
    call's argument packing and binding cost several thousand instructions each."""

    def train(self, mode=True):
        if _tracing() or _flags._is_compiling_flag:
            # eval()/train() inside code dynamo traces (fullgraph too): torch's own, with
            # no thread-local state in the graph. The flags it sets are stored again when
            # the compiled code runs, through the setter.
            return original(self, mode)
        try:
            stack = _local.stack
        except AttributeError:
            stack = _local.stack = []
        stack.append((self, mode))
        try:
            return original(self, mode)
        finally:
            stack.pop()
            if not stack:
                _local.site = None

    return _mark(train, original)


def _override_site(value: bool):
    """Slow path: is a model's own ``train(mode)`` override, asked for the opposite mode,
    running above this change (mmdetection's norm_eval, "keep the backbone in eval")?
    Returns the ModeSite to record, or None."""
    f = sys._getframe(3)
    while f is not None:
        code = f.f_code
        if code.co_name == "train" and not _is_internal(code):
            owner = f.f_locals.get("self")
            if isinstance(owner, nn.Module) and bool(f.f_locals.get("mode", True)) != value:
                # An override that only passes its arguments on (`def train(self, *args)`,
                # `def train(self, on=True)`) reaches this change through nn.Module.train
                # on itself with this very mode: that is the user's own eval()/train().
                if any(inst is owner and bool(m) == value for inst, m in getattr(_local, "stack", ())):
                    return None
                caller = f.f_back
                while caller is not None and _is_internal(caller.f_code):
                    caller = caller.f_back
                loc = Location(caller.f_code.co_filename, caller.f_lineno, caller.f_code.co_name) if caller else None
                return ModeSite(value, "override", loc, type(owner).__name__)
        f = f.f_back
    return None


def _train_call_location(depth: int) -> Optional[Location]:
    """The user's ``model.train()``/``eval()`` call: above the model's own ``train()``
    override, if it has one, which is not where the user asked for the mode."""
    f = user_frame(depth)
    while f is not None and f.f_code.co_name in ("train", "eval") and isinstance(f.f_locals.get("self"), nn.Module):
        f = f.f_back
        while f is not None and _is_internal(f.f_code):
            f = f.f_back
    return Location(f.f_code.co_filename, f.f_lineno, f.f_code.co_name) if f is not None else None


def _note_training(module: nn.Module, value) -> None:
    """Slow path, run only when a module's flag really changes."""
    MODE_EPOCH[0] += 1
    _epoch_moved()
    value = bool(value)
    override = _override_site(value)
    if override is not None:
        _sites[module] = _user_sites[module] = override
        return
    stack = getattr(_local, "stack", None)
    if stack:
        site = getattr(_local, "site", None)
        if site is None or site.training != value:
            how = f"{type(stack[0][0]).__name__}.{'train' if value else 'eval'}()"
            site = _local.site = ModeSite(value, how, _train_call_location(3), framework=framework_caller())
        _sites[module] = site
        if site.framework is None:
            _user_sites[module] = site
    elif framework_caller() is not None:
        # A framework putting back modes it saved (Lightning's _ModuleMode.restore after
        # validation) is not where a mode was set: the user's last site for it stands.
        prev = _user_sites.get(module)
        if prev is not None and prev.training == value:
            _sites[module] = prev
        else:
            _sites.pop(module, None)
    else:
        # Start low: internal frames are skipped, and starting past the user's frame
        # would blame their caller.
        _sites[module] = _user_sites[module] = ModeSite(value, "assignment", user_location(1))


class TrainingFlag:
    """``nn.Module.training`` while modeguard is installed: a data descriptor with a
    setter and no getter, which sees every change of the flag at no cost to anything else.

    Every attribute assignment on every module goes through ``nn.Module.__setattr__``
    (Lightning assigns on the LightningModule around each hook call, about 44 times a
    step), so wrapping that method cost each of them a Python call (about 690
    instructions, counted with callgrind). The descriptor is looked up only for the name
    ``training``: torch's own ``__setattr__`` stores a plain value with
    ``object.__setattr__``, which hands it to ``__set__`` here; so does a module's
    ``__init__`` (``super().__setattr__("training", True)``), and ``object.__setattr__``
    called directly. With no ``__get__``, reading ``module.training`` finds the value in
    the instance's ``__dict__`` exactly as before (attribute reads on modules are never
    specialised by the interpreter: ``nn.Module`` defines ``__getattr__``), and the value
    stays in ``__dict__``, where pickles, copies, TorchScript and dynamo look for it."""

    __slots__ = ()

    def __set__(self, module, value):
        d = module.__dict__
        old = d.get("training")
        try:
            # `old is None` is construction (Module.__init__): not a mode change. Inside
            # code dynamo traces nothing is noted (no hooks or thread-locals in a graph):
            # the compiled code stores the flag again, through here, when it runs.
            if old is not None and old != value and not (_tracing() or _flags._is_compiling_flag):
                _note_training(module, value)
        except Exception:
            # Never break the user's eval()/train() over bookkeeping. (A module class
            # with __eq__ and no __hash__ cannot key the weak site table: its mode
            # change still counts, the epoch moved first, but its site is lost. A
            # tensor assigned as the flag cannot be compared.)
            pass
        d["training"] = value

    def __delete__(self, module):
        try:
            del module.__dict__["training"]
        except KeyError:
            raise AttributeError("training") from None
        # A class that deletes the flag serves it some other way (from ``__getattr__``,
        # as TorchScript's do): from now on its reads go through ``DictTraining``.
        _serve_from_getattr(type(module))


class DictTraining(TrainingFlag):
    """For module classes that delete ``training`` from their instances and serve it from
    ``__getattr__`` (TorchScript's ``RecursiveScriptModule`` and ``TracedModule``, whose
    flag lives on the C++ module): with no getter, a read would find ``TrainingFlag``
    itself on the class once the instance has none. This one reads the instance's own
    value or says there is none, so ``__getattr__`` answers as without modeguard."""

    __slots__ = ()

    def __get__(self, module, owner=None):
        if module is None:
            return self
        try:
            return module.__dict__["training"]
        except KeyError:
            raise AttributeError("training") from None


def _patched_compile(original):
    """``nn.Module.compile`` (``model.compile()``, which sets ``_compiled_call_impl``):
    a watched model compiled in place is watched from outside its compiled code."""

    def compile(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        _compiled_in_place(self)
        return out

    return _mark(compile, original)


def _mark(replacement, original):
    # Named and documented as the original, reachable through ``__wrapped__`` (as
    # inspect and functools expect), and recognisable as modeguard's (``is_patched``).
    functools.update_wrapper(replacement, original)
    replacement.__modeguard_patch__ = True
    return replacement


def _on_structure_change(*_args):
    STRUCTURE_EPOCH[0] += 1
    _epoch_moved()


def _on_parameter_registered(module, name, param):
    # A new parameter changes the structure; one assigned again under a name the module
    # already has does not. FSDP2's fully_shard swaps sharded and unsharded parameters
    # in and out of every module around each forward: not a change of the model.
    if name not in module._parameters:
        _on_structure_change()


def _on_module_registered(module, name, submodule):
    _on_structure_change()
    if name == "_orig_mod":  # torch.compile(model) wrapping a model
        try:
            from .._compiled import on_wrapped

            on_wrapped(module, submodule)
        except Exception:  # never break the user's torch.compile() over bookkeeping
            pass


def _compiled_in_place(module):
    try:
        from .._compiled import on_compiled_in_place

        on_compiled_in_place(module)
    except Exception:
        pass


def _classes_serving_training() -> list:
    """TorchScript's module classes, which delete ``training`` (see ``DictTraining``):
    ``ScriptModule`` (the base of scripted modules and of the legacy subclasses with
    ``@torch.jit.script_method``) and ``TracedModule``. Their instances made before
    modeguard was installed have no flag to delete any more, so these are named here."""
    found = []
    try:
        import torch.jit._script as script
        import torch.jit._trace as trace
    except Exception:  # a torch without them: nothing to shadow
        return found
    for owner, name in ((script, "ScriptModule"), (trace, "TracedModule")):
        cls = getattr(owner, name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module) and "training" not in cls.__dict__:
            found.append(cls)
    return found


def _serve_from_getattr(cls: type) -> None:
    """Give ``cls`` a ``DictTraining`` unless it, or a base below ``nn.Module``, has one."""
    for base in cls.__mro__:
        held = base.__dict__.get("training")
        if held is not None:
            if isinstance(held, DictTraining) or not isinstance(held, TrainingFlag):
                return  # served already, or the class defines its own `training`
            break
    try:
        PATCHES.add(cls, "training", DictTraining())
    except Exception:  # a class that refuses attributes: its reads stay as they are
        pass


def _install(patches: Patches) -> None:
    patches.replace(nn.Module, "train", _patched_train(nn.Module.__dict__["train"]))
    if "training" not in nn.Module.__dict__:  # an annotation only, in every torch
        patches.replace(nn.Module, "training", TrainingFlag())
        for cls in _classes_serving_training():
            patches.replace(cls, "training", DictTraining())
    if "compile" in nn.Module.__dict__:  # torch >= 2.2
        patches.replace(nn.Module, "compile", _patched_compile(nn.Module.__dict__["compile"]))
    patches.replace(nn.Module, "__getstate__",
                    wrapt.FunctionWrapper(nn.Module.__dict__["__getstate__"], pickling.getstate_wrapper))
    if "__reduce_ex__" not in nn.Module.__dict__:
        patches.replace(nn.Module, "__reduce_ex__", pickling.module_reduce_ex)
    reg = nn.modules.module
    patches.add_handle(reg.register_module_module_registration_hook(_on_module_registered))
    patches.add_handle(reg.register_module_parameter_registration_hook(_on_parameter_registered))
    STRUCTURE_EPOCH[0] += 1
    MODE_EPOCH[0] += 1


#: Installed while at least one guard is active (Guard acquires, unwatch() or the
#: guard's finaliser releases), so nn.Module's methods are the originals again once no
#: guard is alive.
PATCHES = SharedPatches(_install)


def is_patched() -> bool:
    """True while modeguard's patches are on nn.Module (for tests and diagnostics)."""
    return getattr(nn.Module.__dict__["train"], "__modeguard_patch__", False)
