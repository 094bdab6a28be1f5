"""Tying a backward to the forward that built its graph.

After a grad-enabled forward of a watched model that the rules need to follow (see
``Guard``: eval or mixed modes, a forward that may be evaluation, or a sampled training
forward), the distinct ``grad_fn`` nodes of its outputs get a backward pre-hook
(PyTorch's ``Node.register_prehook``) that marks the forward's record as used. The graph
owns that hook object and drops it when the graph is freed, so the hook doubles as the
sentinel: when it dies and nothing backpropagated through it, the record goes on a queue
that the next hook call drains. Nodes are not weak-referenceable, and holding tensors
would keep activations alive, so this is how a graph's fate is learnt without owning it.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections import deque
from collections.abc import Mapping

import torch

#: Bumped by every backward into a watched model and every watched optimizer step.
ACTIVITY = [0]
#: Records whose graph was freed without a backward, waiting for a safe moment.
RELEASED: deque = deque()

_MAX_NODES = 16


class ForwardRecord:
    """What modeguard keeps about one grad-enabled forward of a watched model."""

    __slots__ = ("root", "snapshot", "where", "allowed", "seq", "probe", "used", "judged", "called_at", "__weakref__")

    def __init__(self, root, snapshot, where, allowed, seq, probe=None):
        self.root = root          # RootState (holds the model only weakly)
        self.snapshot = snapshot  # ModeSnapshot the forward ran under
        self.where = where        # (code, line) of the user's call, or None
        self.allowed = allowed    # rule codes silenced by allow() around the forward
        self.seq = seq            # the root's grad-enabled forward count at this forward
        self.probe = probe        # observe.inputs readings of this forward, or None
        self.used = False         # a backward passed through its graph
        self.judged = False       # counted as unused while its graph was still alive
        # (code, line) of the frame that called the model, whoever's it is (a framework's
        # or the user's), or None: where a step run by a framework got its gradients.
        self.called_at = None


class PresumedForward:
    """The latest training forward that was not followed into the autograd graph.

    A grad-enabled forward with every mode-sensitive module in train mode is what a
    training step is made of, and the rules need no proof of its backward: it is
    presumed to be backpropagated. One object per watched model, updated in place, so
    the common forward allocates nothing."""

    __slots__ = ("snapshot", "allowed", "seq", "activity", "code", "line", "judged")

    def __init__(self):
        self.snapshot = None
        self.allowed = None
        self.seq = -1
        self.activity = -1  # ACTIVITY at that forward: what a backward or step since moves
        # The caller's code object and line (no frame kept), for the one case where this
        # forward turns out to be an evaluation: the last one before a report.
        self.code = None
        self.line = 0
        self.judged = -1  # the seq already judged at a report


#: The graph watches alive now, held weakly: what a report counts as unused when the
#: graph outlives it (generation that feeds its hidden state back builds one graph that
#: is never freed before the program ends).
LIVE: "weakref.WeakSet[_GraphWatch]" = weakref.WeakSet()


class _GraphWatch:
    """The backward pre-hook on a forward's output nodes, and its graph's sentinel."""

    __slots__ = ("record", "on_backward", "__weakref__")

    def __init__(self, record, on_backward):
        self.record = record
        self.on_backward = on_backward

    def __call__(self, grad_outputs):
        rec = self.record
        if not rec.used:
            rec.used = True
            self.on_backward(rec)

    def __del__(self):
        # Runs wherever the graph happens to be freed: only enqueue.
        rec = self.record
        if not rec.used and not rec.judged:
            RELEASED.append(rec)


def judge_live(guard) -> None:
    """A report is being made: the graphs of ``guard``'s models that are still alive and
    were never backpropagated count as unused now (and not again when they are freed)."""
    for watch in list(LIVE):
        rec = watch.record
        if not rec.used and not rec.judged and rec.root.guard is guard:
            rec.judged = True
            RELEASED.append(rec)


def _grad_fns(obj, out: list, depth: int = 0) -> None:
    if len(out) >= _MAX_NODES or depth > 4:
        return
    if isinstance(obj, torch.Tensor):
        fn = obj.grad_fn
        if fn is not None and fn not in out:
            out.append(fn)
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            _grad_fns(item, out, depth + 1)
    elif isinstance(obj, Mapping):
        for item in obj.values():
            _grad_fns(item, out, depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _grad_fns(getattr(obj, f.name, None), out, depth + 1)


def output_grad_fns(output) -> list:
    out: list = []
    _grad_fns(output, out)
    return out


def attach(record: ForwardRecord, nodes: list, on_backward) -> None:
    """Watch the graph rooted at ``nodes`` on behalf of ``record``."""
    watch = _GraphWatch(record, on_backward)
    for node in nodes:
        node.register_prehook(watch)
    LIVE.add(watch)


#: What a forward that returns a plain Python value returns (``loss.item()``). Not None:
#: a forward that returns nothing may keep its outputs on the module for later.
PLAIN = frozenset((bool, int, float, complex, str))


def holds_no_graph(output) -> bool:
    """An output made only of plain Python values (``loss.item()``, a dict of metrics):
    whatever graph its forward built is gone, and no backward can use it. A tensor, even
    a detached one (an adversarial example computed inside the forward), or an object of
    any other kind, is not judged."""
    if output.__class__ in PLAIN:
        return True
    if isinstance(output, (tuple, list)):
        return all(holds_no_graph(item) for item in output[:_MAX_NODES])
    if isinstance(output, dict):
        return all(holds_no_graph(item) for item in list(output.values())[:_MAX_NODES])
    return False
