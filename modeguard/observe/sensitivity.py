"""Which modules care about their mode, and which are frozen on purpose.

A module is mode-sensitive when its output or its state depends on ``self.training``:
Dropout (p > 0), BatchNorm and InstanceNorm with running statistics, RReLU, attention and
RNNs with dropout, any module whose own ``forward`` reads ``self.training`` (Hugging Face
style ``F.dropout(x, training=self.training)``), and whatever the user registers. The
answer is cached per class; nothing here runs on the hot path.
"""

from __future__ import annotations

import ast
import fnmatch
import inspect
import textwrap
import types
import weakref
from typing import Callable, Iterable, Optional, Union

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.rnn import RNNBase

from . import modes

# Torch classes whose forward reads self.training only to choose a fast kernel: the
# numbers do not depend on it (their Dropout children are sensitive on their own).
_FASTPATH_ONLY = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder, nn.Transformer)

_registered: dict = {}  # class -> kind
_predicates: list = []  # (predicate, kind)
_reads_training_cache: dict = {}


def register_sensitive(cls_or_predicate: Union[type, Callable[[nn.Module], bool]], kind: str = "registered") -> None:
    """Declare that a module class (or any module for which ``predicate(module)`` is true)
    behaves differently in train and eval mode."""
    if isinstance(cls_or_predicate, type):
        if not issubclass(cls_or_predicate, nn.Module):
            raise TypeError(f"register_sensitive expects an nn.Module subclass or a predicate, got {cls_or_predicate!r}")
        _registered[cls_or_predicate] = kind
    elif callable(cls_or_predicate):
        _predicates.append((cls_or_predicate, kind))
    else:
        raise TypeError(f"register_sensitive expects an nn.Module subclass or a predicate, got {cls_or_predicate!r}")
    modes.bump_mode_epoch()


def _code_reads_training(code: types.CodeType) -> bool:
    if "training" in code.co_names:
        return True
    return any(isinstance(c, types.CodeType) and _code_reads_training(c) for c in code.co_consts)


def _is_checkpointing_flag(node: ast.AST) -> bool:
    """``self.gradient_checkpointing``, or ``getattr(self, "gradient_checkpointing", ...)``."""
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and n.attr == "gradient_checkpointing":
            return True
        if isinstance(n, ast.Constant) and n.value == "gradient_checkpointing":
            return True
    return False


def _reads_training_only_to_checkpoint(fn) -> bool:
    """Does every ``.training`` in ``fn``'s source stand in an ``and`` with the module's
    ``gradient_checkpointing`` flag? (Hugging Face models and layers: ``if
    self.gradient_checkpointing and self.training:`` picks how to compute, not what.)
    False where the source cannot be read: then the read counts."""
    try:
        # The code object's own source: inspect.getsource(fn) would follow __wrapped__.
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn.__code__)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return False
    reads = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "training"]
    guarded = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.BoolOp) and isinstance(n.op, ast.And) and any(_is_checkpointing_flag(v) for v in n.values):
            for v in n.values:
                if isinstance(v, ast.Attribute) and v.attr == "training":
                    guarded.add(id(v))
    return bool(reads) and all(id(n) in guarded for n in reads)


def _forward_reads_training(cls: type) -> bool:
    """Does ``cls.forward``, or a function it wraps (``functools.wraps`` decorators, as
    Hugging Face's), read ``training`` for something other than gradient checkpointing?"""
    hit = _reads_training_cache.get(cls)
    if hit is None:
        hit = False
        # (A legacy TorchScript module's forward is a descriptor that raises on the class.)
        fn = getattr(cls, "forward", None)
        for _ in range(8):  # a decorator chain; a cycle ends here
            code = getattr(fn, "__code__", None)
            if code is not None and _code_reads_training(code) and not _reads_training_only_to_checkpoint(fn):
                hit = True
                break
            fn = getattr(fn, "__wrapped__", None)
            if fn is None:
                break
        _reads_training_cache[cls] = hit
    return hit


def _dropout_attrs(module: nn.Module) -> list:
    """The values of a custom module's dropout-like float attributes (``self.dropout``,
    ``self.p``, ``attention_dropout``...)."""
    return [
        v for k, v in vars(module).items()
        if isinstance(v, float) and ("dropout" in k.lower() or k in ("p", "drop_prob", "drop_rate"))
    ]


def _dropout_attrs_all_zero(module: nn.Module) -> bool:
    """A custom module with dropout-like float attributes that are all 0 has nothing
    random to switch off (Hugging Face configs with dropout 0.0)."""
    values = _dropout_attrs(module)
    return bool(values) and all(v == 0.0 for v in values)


def classify(module: nn.Module) -> Optional[str]:
    """The kind of mode-sensitivity of ``module`` ("dropout", "batchnorm", ...), or None."""
    for cls in type(module).__mro__:
        kind = _registered.get(cls)
        if kind is not None:
            return kind
    for pred, kind in _predicates:
        if pred(module):
            return kind
    if isinstance(module, _DropoutNd):
        return "dropout" if module.p > 0 else None
    if isinstance(module, _BatchNorm):
        # Without running statistics BatchNorm uses batch statistics in both modes.
        return "batchnorm" if module.track_running_stats else None
    if isinstance(module, _InstanceNorm):
        return "instancenorm" if module.track_running_stats else None
    if isinstance(module, nn.MultiheadAttention):
        return "dropout" if module.dropout > 0 else None
    if isinstance(module, RNNBase):
        return "dropout" if module.dropout > 0 and module.num_layers > 1 else None
    if isinstance(module, _FASTPATH_ONLY):
        return None
    if _forward_reads_training(type(module)):
        return None if _dropout_attrs_all_zero(module) else "custom"
    return None


def is_stochastic(module: nn.Module, kind: Optional[str]) -> bool:
    """Is ``module`` random in train mode (Dropout and its kin), not just switching
    statistics (BatchNorm)? A custom module counts when it has a dropout-like attribute
    above 0; one that says nothing about dropout is not presumed random."""
    if kind == "dropout":
        return True
    if kind in ("custom", "registered"):
        return any(v > 0.0 for v in _dropout_attrs(module))
    return False


def is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, (_BatchNorm, _InstanceNorm))


def params_frozen(module: nn.Module, recurse: bool) -> Optional[bool]:
    """True if the module has parameters and none requires grad; None if it has none."""
    seen = False
    # _parameters directly when not recursing: parameters() is a generator chain that
    # costs several times more, and MG301 re-reads this periodically on the step path.
    params = module.parameters() if recurse else module._parameters.values()
    for p in params:
        if p is None:
            continue
        seen = True
        if p.requires_grad:
            return False
    return True if seen else None


# ---- modules the user says are meant to stay in eval --------------------------------

_frozen_marks: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _modules(modules: Iterable[nn.Module], caller: str) -> list:
    out = list(modules)
    for m in out:
        if not isinstance(m, nn.Module):
            raise TypeError(
                f"modeguard.{caller}() expects nn.Module objects (for name patterns, use "
                f"watch(..., frozen=['backbone.*'])), got {type(m).__module__}.{type(m).__name__}"
            )
    return out


def mark_frozen(modules: Iterable[nn.Module]) -> None:
    for m in _modules(modules, "frozen"):
        _frozen_marks.add(m)
    modes.bump_mode_epoch()


def unmark_frozen(modules: Iterable[nn.Module]) -> None:
    for m in _modules(modules, "unfreeze"):
        _frozen_marks.discard(m)
    modes.bump_mode_epoch()


def is_marked_frozen(module: nn.Module) -> bool:
    return module in _frozen_marks


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """``"backbone.*"`` matches ``backbone`` itself and everything under it."""
    for pat in patterns:
        if fnmatch.fnmatchcase(name, pat):
            return True
        if pat.endswith(".*") and name == pat[:-2]:
            return True
    return False
