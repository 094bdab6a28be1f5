"""ModeSnapshot: the modes of one watched model's sensitive modules at one moment.

Built by one walk over the model, only when ``MODE_EPOCH`` or ``STRUCTURE_EPOCH`` moved;
every forward in between shares the same snapshot, which is what keeps the hot path O(1).
Forward records keep a reference to the snapshot they ran under, so a rule that looks at
a step later still sees the modes the gradients were produced with. The modes in a
snapshot never change; what does is learnt later about the same modules: the
``requires_grad`` state re-read by ``refresh_frozen``, and ``step_quiet``, which the guard
recomputes after such a re-read. (What a forward learns about its inputs belongs to that
forward's record: see ``observe/inputs.py``.)
"""

from __future__ import annotations

import weakref
from typing import Iterable

import torch.nn as nn

from . import modes, sensitivity


class SensitiveEntry:
    """One mode-sensitive module of a watched model, as it was at snapshot time."""

    __slots__ = ("name", "ref", "kind", "training", "marked", "is_bn", "stochastic", "own_frozen", "site")

    def __init__(self, name, module, kind, marked):
        self.name = name or "(root)"
        self.ref = weakref.ref(module)
        self.kind = kind
        self.training = module.training
        self.marked = marked
        self.is_bn = sensitivity.is_batchnorm(module)
        self.stochastic = sensitivity.is_stochastic(module, kind)  # random in train mode
        # BatchNorm and friends own their affine parameters; a custom module's
        # parameters may sit in children.
        self.own_frozen = sensitivity.params_frozen(module, recurse=not self.is_bn)
        self.site = modes.last_set(module)

    @property
    def param_free(self) -> bool:
        return self.own_frozen is None

    def refresh_frozen(self) -> None:
        m = self.ref()
        if m is not None:
            self.own_frozen = sensitivity.params_frozen(m, recurse=not self.is_bn)


def walk_marked(root: nn.Module, frozen_patterns: Iterable[str] = ()):
    """``(name, module, marked)`` for every module of ``root``: marked when it, or a module
    above it, is marked with ``modeguard.frozen`` or matches a ``frozen=`` pattern."""
    patterns = tuple(frozen_patterns)
    marked_names = set()
    for name, m in root.named_modules(remove_duplicate=True):
        parent = name.rpartition(".")[0] if name else None
        marked = (
            sensitivity.is_marked_frozen(m)
            or (parent is not None and parent in marked_names)
            or (name != "" and bool(patterns) and sensitivity.matches_any(name, patterns))
        )
        if marked:
            marked_names.add(name)
        yield name, m, marked


class ModeSnapshot:
    __slots__ = (
        "root_training", "entries", "state", "train_sensitive", "eval_sensitive",
        "frozen_bn_in_train", "train_bn", "train_dropout", "probed", "owners", "plain_train", "step_quiet", "__weakref__",
    )

    def __init__(self, root: nn.Module, frozen_patterns: Iterable[str] = ()):
        entries = []
        for name, m, marked in walk_marked(root, frozen_patterns):
            kind = sensitivity.classify(m)
            if kind is not None:
                entries.append(SensitiveEntry(name, m, kind, marked))
        self.root_training = root.training
        self.entries = tuple(entries)
        self.train_sensitive = tuple(e for e in entries if e.training)
        self.eval_sensitive = tuple(e for e in entries if not e.training)
        if not entries:
            self.state = "none"
        elif not self.eval_sensitive:
            self.state = "train"
        elif not self.train_sensitive:
            self.state = "eval"
        else:
            self.state = "mixed"
        #: A training forward in the ordinary sense: the root and every mode-sensitive
        #: module in train mode. The hot path keeps no per-forward record for these.
        self.plain_train = self.root_training and self.state in ("train", "none")
        self.train_bn = tuple(e for e in self.train_sensitive if e.is_bn)
        #: Modules that are random in this snapshot: in train mode, stochastic, not marked.
        self.train_dropout = tuple(e for e in self.train_sensitive if e.stochastic and not e.marked)
        self.frozen_bn_in_train = self._frozen_bn()
        #: (index, entry) of the modules every grad-enabled forward probes (needs_probe)
        self.probed = self.needs_probe()
        #: ids of the modules with parameters of their own, once a forward is probed
        self.owners = None
        #: Set by the guard from its step rules (Rule.step_quiet): a step on gradients
        #: from a forward under this snapshot needs no rule called.
        self.step_quiet = False

    def _frozen_bn(self) -> tuple:
        return tuple(e for e in self.train_bn if e.own_frozen is True)

    def refresh_frozen(self, entries=None) -> None:
        """requires_grad flips have no hook: re-read them, for ``entries`` (default all;
        MG301's periodic re-read passes ``train_bn``, all that it needs)."""
        for e in self.entries if entries is None else entries:
            e.refresh_frozen()
        self.frozen_bn_in_train = self._frozen_bn()

    def needs_probe(self) -> tuple:
        """Parameter-free sensitive modules in eval: whether they are frozen on purpose
        depends on where their input comes from, which only a forward can tell."""
        return tuple(
            (i, e) for i, e in enumerate(self.entries)
            if not e.training and e.param_free and not e.marked
        )
