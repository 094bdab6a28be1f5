"""The oracle: random programs checked against a small reference model of the rules.

Hypothesis generates a module tree (nesting, Linear, Dropout with p = 0 and p > 0,
BatchNorm with and without affine parameters and running statistics, custom modules
that read ``self.training``, a dropout that ignores eval, shared submodules) and a
program over it (``train()``/``eval()`` on any module, ``.training =``, ``requires_grad_``
flips, forwards under grad/no_grad/inference_mode, backwards, skipped backwards, freed
graphs, ``zero_grad()`` and steps). The program runs twice: on an unwatched twin, whose
run records what really happened (the trace), and under ``modeguard.watch`` with
the default settings (no forward sampled). The reference model below reads only the trace and says which
rules must be reported; on every example, modeguard must raise nothing, change nothing
(outputs, parameters, buffers and gradients equal the twin's), keep ``mode_map()`` equal
to the real flags, and leave no hook or patch behind.

Reading order: the models, the program generator, the interpreter (one for both runs),
the reference model (one function per rule), the test.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st

import modeguard
from modeguard.observe import modes

EXAMPLES = 1000  # a fixed number, for a predictable run time (about 20 s on 2 cores)
D, N = 4, 6  # every layer maps D features to D; batches of N rows (BatchNorm needs N > 1)

#: The default: no ordinary training forward is followed into autograd. A skipped
#: backward is still certain (MG602 reads the gradients at every step), and two
#: grad-enabled evaluation forwards are enough (MG201).
BACKWARD_SAMPLE = None


@pytest.fixture(autouse=True)
def _settings_of_its_own(monkeypatch):
    """The oracle states its own settings: none come from the environment. One torch
    thread: on a busy machine a second one makes each tiny BatchNorm call wait
    milliseconds for a core."""
    for name in ("MODEGUARD", "MODEGUARD_RULES", "MODEGUARD_BACKWARD_SAMPLE"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reseed(n: int) -> None:
    """torch.manual_seed without its CUDA/XPU/MTIA bookkeeping (a stack capture each)."""
    torch.default_generator.manual_seed(n)


# ---- the modules programs are made of ---------------------------------------------------


class Net(nn.Sequential):
    """The root: a plain container, not mode-sensitive itself."""


class HFDropout(nn.Module):
    """Hugging Face style: ``F.dropout(x, self.dropout, self.training)``, optionally after
    a Linear child (its parameters are the module's own for MG101's frozen check)."""

    def __init__(self, dropout: float, dense: bool):
        super().__init__()
        self.dropout = dropout
        self.dense = nn.Linear(D, D) if dense else None

    def forward(self, x):
        if self.dense is not None:
            x = self.dense(x)
        return F.dropout(x, self.dropout, self.training)


class TrainOnlyScale(nn.Module):
    """Reads ``self.training`` with no dropout attribute: always mode-sensitive."""

    def forward(self, x):
        return x * 0.5 if self.training else x


class DropoutIgnoringEval(nn.Module):
    """Random in eval mode too: never reads the flag. ``training=True`` written at the
    call site, so MG202 takes it for Monte-Carlo dropout on purpose."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, True)


def build(tree: tuple, seed: int) -> Net:
    """The model a tree spec describes, initialised from ``seed``. A ``("shared", k)``
    node is the k-th module built so far (mod their number), used a second time."""
    reseed(seed)
    built: List[nn.Module] = []

    def make(spec) -> nn.Module:
        kind = spec[0]
        if kind == "shared":
            return built[spec[1] % len(built)] if built else nn.Linear(D, D)
        if kind == "seq":
            m = nn.Sequential(*[make(c) for c in spec[1]])
        elif kind == "linear":
            m = nn.Linear(D, D)
        elif kind == "dropout":
            m = nn.Dropout(spec[1])
        elif kind == "bn":
            m = nn.BatchNorm1d(D, affine=spec[1], track_running_stats=spec[2])
        elif kind == "hf":
            m = HFDropout(spec[1], spec[2])
        elif kind == "scale":
            m = TrainOnlyScale()
        elif kind == "noisy":
            m = DropoutIgnoringEval(spec[1])
        else:
            raise ValueError(f"unknown node {spec!r}")
        built.append(m)
        return m

    model = Net(*[make(spec) for spec in tree])
    if not any(True for _ in model.parameters()):
        model.append(nn.Linear(D, D))  # an optimizer needs something to hold
    return model


# ---- the program generator --------------------------------------------------------------


@dataclass(frozen=True)
class Program:
    """A module tree and the ops run on it. Module and parameter indices are taken
    modulo the model's ``named_modules()``/``named_parameters()`` (index 0 is the root)."""

    tree: tuple
    ops: tuple
    seed: int = 0


def weighted(*pairs):
    """One of the strategies, drawn in proportion to their weights."""
    return st.sampled_from([s for weight, s in pairs for _ in range(weight)]).flatmap(lambda s: s)


def _seq(children):
    return ("seq", tuple(children))


_leaf = weighted(
    (3, st.just(("linear",))),
    (3, st.sampled_from([("dropout", 0.0), ("dropout", 0.5), ("dropout", 0.5)])),
    (3, st.sampled_from([("bn", True, True), ("bn", True, True), ("bn", True, False), ("bn", False, True),
                         ("bn", False, False)])),  # affine, track_running_stats
    (2, st.tuples(st.just("hf"), st.sampled_from([0.0, 0.3]), st.booleans())),  # dropout, dense child
    (1, st.just(("scale",))),
    (1, st.just(("noisy", 0.5))),
    (1, st.tuples(st.just("shared"), st.integers(0, 7))),
)
_block = st.lists(_leaf, min_size=1, max_size=3).map(_seq)
_node = weighted((3, _leaf), (1, _block), (1, st.lists(st.one_of(_leaf, _block), min_size=1, max_size=3).map(_seq)))
trees = st.lists(_node, min_size=2, max_size=5).map(tuple)

_index = st.integers(0, 15)
_training_op = st.sampled_from([
    ("forward", "grad"), ("forward", "grad"), ("forward", "no_grad"), ("forward", "inference"),
    ("backward",), ("backward",), ("step",), ("step",), ("zero_grad",), ("drop",),
])
_mode_op = weighted(
    (2, st.tuples(st.sampled_from(["train", "eval"]), _index)),
    (1, st.sampled_from([("train", 0), ("eval", 0)])),  # the root, more often than 1 in n
    (1, st.tuples(st.just("set"), _index, st.booleans())),
)
_grad_op = st.one_of(
    st.tuples(st.just("requires_grad"), _index, st.booleans()),        # module.requires_grad_(flag)
    st.tuples(st.just("requires_grad_param"), _index, st.booleans()),  # one parameter
    st.tuples(st.just("requires_grad_bn"), st.booleans()),             # every BatchNorm
)
#: A program is a list of moves: single ops, and whole pieces of a training loop, so that
#: steps that train, validations and the bugs between them come up often.
_move = weighted(
    (6, st.just((("zero_grad",), ("forward", "grad"), ("backward",), ("step",)))),  # a training step
    (4, _training_op.map(lambda op: (op,))),
    (3, _mode_op.map(lambda op: (op,))),
    (2, _grad_op.map(lambda op: (op,))),
    (2, st.just((("eval", 0), ("forward", "no_grad"), ("forward", "no_grad")))),  # validate(), no train() after
    (1, st.just((("forward", "no_grad"), ("forward", "no_grad")))),               # evaluation in train mode
    (1, st.just((("forward", "grad"), ("drop",), ("forward", "grad"), ("drop",)))),  # ... with grad enabled
    # A training forward between two no_grad ones (a GAN's fake batch, logging), then its backward.
    (1, st.just((("forward", "no_grad"), ("forward", "grad"), ("forward", "no_grad"), ("backward",), ("step",)))),
    # Fine-tuning: freeze a part, or put it in eval, then train.
    (2, st.tuples(st.tuples(st.just("requires_grad"), _index, st.just(False)), st.just(("train", 0)))),
    (2, st.tuples(st.just(("train", 0)), st.tuples(st.just("eval"), _index))),
    (2, st.just((("requires_grad_bn", False), ("train", 0)))),
    # Gradual unfreezing: a requires_grad flip, then a training step, with no mode change.
    (2, st.tuples(st.tuples(st.just("requires_grad"), _index, st.booleans()), st.just(("zero_grad",)),
                  st.just(("forward", "grad")), st.just(("backward",)), st.just(("step",)))),
)

programs = st.builds(
    Program,
    tree=trees,
    ops=st.lists(_move, min_size=4, max_size=16).map(lambda moves: tuple(op for move in moves for op in move)),
    seed=st.integers(0, 2**16),
)


# ---- the interpreter: one program, run on the twin and on the watched model ---------------


@dataclass
class Event:
    """What one op left behind in the twin: the true flags, and what it did to graphs.
    Event 0 is ``watch()`` itself (the state before the first op)."""

    op: tuple
    training: Dict[str, bool]       # module name -> .training after the op
    requires_grad: Dict[str, bool]  # parameter name -> requires_grad after the op
    grad: Optional[bool] = None     # a forward: grad-enabled?
    # A forward, per module call: (its input required grad, it was fed the model's own
    # input through modules without parameters only).
    inputs: Dict[str, List[Tuple[bool, bool]]] = field(default_factory=dict)
    uses: Optional[int] = None      # a backward: the forward (event index) it went through
    frees: Optional[int] = None     # the forward whose graph this op freed without a backward

    @property
    def forward(self) -> bool:
        return self.grad is not None


@dataclass
class Run:
    outputs: List[torch.Tensor]
    events: List[Event]
    pending: Optional[tuple]  # (event index, output) of the graph still alive at report time


class InputProbe:
    """Forward pre-hooks on the twin only: whether each module's input required grad,
    and whether it came from the model's own input through modules without parameters
    (the trees are chains, so: no module with parameters of its own ran before it in
    this forward): the ground truth for MG101's frozen extractors."""

    def __init__(self, model: nn.Module):
        self.names = {id(m): name for name, m in model.named_modules()}
        self.owners = {id(m) for m in model.modules() if list(m.parameters(recurse=False))}
        self.root_input = None
        self.behind_a_layer = False
        self.calls: Optional[Dict[str, List[Tuple[bool, bool]]]] = None
        self.handles = [m.register_forward_pre_hook(self._pre) for _, m in model.named_modules()]

    def start(self, x) -> None:
        self.root_input, self.calls, self.behind_a_layer = x, {}, False

    def _pre(self, module, args):
        if self.calls is not None and torch.is_grad_enabled():
            (x,) = args
            fed = x is self.root_input or not self.behind_a_layer
            self.calls.setdefault(self.names[id(module)], []).append((x.requires_grad, fed))
            self.behind_a_layer = self.behind_a_layer or id(module) in self.owners

    def remove(self):
        for h in self.handles:
            h.remove()


_NO_GRAD = {"grad": contextlib.nullcontext, "no_grad": torch.no_grad, "inference": torch.inference_mode}


def interpret(program: Program, model: nn.Module, opt, after_op=None, probe: Optional[InputProbe] = None) -> Run:
    """Run the ops. The latest grad-enabled forward's output is kept until a backward uses
    it, a ``drop`` frees it, the next grad-enabled forward replaces it, or a ``step`` (a
    skipped backward's loss goes out of scope before the step): then its graph is freed."""
    modules = [m for _, m in model.named_modules()]
    params = [p for _, p in model.named_parameters()]
    outputs: List[torch.Tensor] = []
    events = [_event(("watch",), model)]
    pending = None
    reseed(program.seed + 1)  # dropout masks: the same in both runs
    for k, op in enumerate(program.ops, 1):
        kind, frees, uses, extra = op[0], None, None, {}
        if kind in ("train", "eval"):
            getattr(modules[op[1] % len(modules)], kind)()
        elif kind == "set":
            modules[op[1] % len(modules)].training = op[2]
        elif kind == "requires_grad":
            modules[op[1] % len(modules)].requires_grad_(op[2])
        elif kind == "requires_grad_param":
            params[op[1] % len(params)].requires_grad_(op[2])
        elif kind == "requires_grad_bn":  # every BatchNorm, as fine-tuning code freezes them
            for m in modules:
                if isinstance(m, nn.BatchNorm1d):
                    m.requires_grad_(op[1])
        elif kind == "forward":
            x = torch.randn(N, D, generator=torch.Generator().manual_seed(program.seed + k))
            if probe is not None:
                probe.start(x)
            with _NO_GRAD[op[1]]():
                out = model(x)
                outputs.append(out.detach().clone())
            extra = {"grad": op[1] == "grad", "inputs": probe.calls if probe else {}}
            if probe is not None:
                probe.root_input = probe.calls = None
            if op[1] == "grad":
                frees = pending[0] if pending is not None else None
                pending = (k, out) if out.requires_grad else None  # frees the previous graph here
            del out, x
        elif kind == "backward":
            if pending is not None:
                uses = pending[0]
                pending[1].pow(2).mean().backward()
                pending = None
        elif kind == "drop":
            frees, pending = (pending[0] if pending is not None else None), None
        elif kind == "zero_grad":
            opt.zero_grad()
        elif kind == "step":
            frees, pending = (pending[0] if pending is not None else None), None
            opt.step()
        else:
            raise ValueError(f"unknown op {op!r}")
        events.append(_event(op, model, uses=uses, frees=frees, **extra))
        if after_op is not None:
            after_op(k)
    return Run(outputs, events, pending)


def _event(op, model, **kw) -> Event:
    return Event(op, {n: m.training for n, m in model.named_modules()},
                 {n: p.requires_grad for n, p in model.named_parameters()}, **kw)


# ---- the reference model ----------------------------------------------------------------
#
# What each rule promises, from its docstring, explanation, quiet_when, its tests and the
# README's Limitations, computed from the trace alone. One function per rule; each returns
# True (must be reported), False (must not be), or None where modeguard promises neither
# (said why at the spot). The findings are read before unwatch(), so a graph still alive at
# the end is not judged here (tests/test_rule_eval_graph_unused.py covers that).


@dataclass
class Facts:
    """What the reference needs to know about the model's modules (by their
    ``named_modules()`` names; a shared module under its first name)."""

    kinds: Dict[str, Optional[str]]  # "dropout", "batchnorm", "custom", or None: not mode-sensitive
    own_params: Dict[str, Tuple[str, ...]]  # the parameters MG101 and MG301 call a module's own
    all_params: Dict[str, Tuple[str, ...]]  # every parameter under the module
    random: Dict[str, bool]  # a custom module with a dropout above 0 (random in train mode)


def facts_of(model: nn.Module) -> Facts:
    pname = {id(p): n for n, p in model.named_parameters()}
    kinds, own, everything, random = {}, {}, {}, {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Dropout):
            kinds[name] = "dropout" if m.p > 0 else None
        elif isinstance(m, nn.BatchNorm1d):
            kinds[name] = "batchnorm" if m.track_running_stats else None
        elif isinstance(m, HFDropout):
            kinds[name] = "custom" if m.dropout > 0 else None  # dropout 0.0: nothing random to switch
        elif isinstance(m, TrainOnlyScale):
            kinds[name] = "custom"
        else:
            kinds[name] = None  # Linear, containers, DropoutIgnoringEval (reads no flag)
        # BatchNorm owns its affine parameters; a custom module's may sit in children.
        own[name] = tuple(pname[id(p)] for p in m.parameters(recurse=isinstance(m, HFDropout)))
        everything[name] = tuple(pname[id(p)] for p in m.parameters())
        random[name] = isinstance(m, HFDropout) and m.dropout > 0
    return Facts(kinds, own, everything, random)


def applied_steps(events):
    """``(step index, forward index)`` for each step that had a backward since the
    previous step, with the forward of the latest such backward: the gradients it applies."""
    latest = None
    for k, ev in enumerate(events):
        if ev.uses is not None:
            latest = ev.uses
        elif ev.op[0] == "step":
            if latest is not None:
                yield k, latest
            latest = None


def evaluating_in_train_mode(fwd: Event, facts: Facts) -> bool:
    """The forward ran with the root and some mode-sensitive module in train mode."""
    return fwd.training[""] and any(fwd.training[n] for n, k in facts.kinds.items() if k)


def mc_dropout(fwd: Event, facts: Facts) -> bool:
    """Monte-Carlo dropout: some sensitive module in eval, and only Dropout left in train."""
    sensitive = [n for n, k in facts.kinds.items() if k]
    return (any(not fwd.training[n] for n in sensitive)
            and all(facts.kinds[n] == "dropout" for n in sensitive if fwd.training[n]))


def streak_needed(trained: bool) -> int:
    """Evaluation-like forwards in a row before MG201: 2 for a model a backward has
    reached; 8 for one never trained (a teacher) in a program that has an optimizer."""
    return 2 if trained else 8


def expect_step_in_eval(events, facts: Facts) -> Dict[int, set]:
    """MG101, per step that applies gradients: the modules that must be reported. The
    offenders are the sensitive modules in eval in the forward the step applies that are
    not frozen on purpose: a module with parameters of its own is frozen when none
    requires grad as the step runs; a parameter-free one (see ``trained_through``)."""
    return {k: offenders(events[k], events[i], facts) for k, i in applied_steps(events)}


def offenders(step: Event, fwd: Event, facts: Facts) -> set:
    found = set()
    for name, kind in facts.kinds.items():
        if kind is None or fwd.training[name]:
            continue
        own = facts.own_params[name]
        trained = any(step.requires_grad[p] for p in own) if own else trained_through(name, step, fwd, facts)
        if trained:
            found.add(name or "(root)")
    return found


def trained_through(name: str, step: Event, fwd: Event, facts: Facts) -> bool:
    """A parameter-free module in eval takes part in training when, in some call of the
    forward, its input required grad, or it was fed the model's own input through
    parameter-free modules only (an input-layer Dropout), unless then its nearest enclosing
    module with parameters, below the root, has them all frozen (it is that part's)."""
    calls = fwd.inputs.get(name, ())
    if any(needs_grad for needs_grad, _ in calls):
        return True
    return any(fed for _, fed in calls) and not in_frozen_part(name, step, facts)


def in_frozen_part(name: str, step: Event, facts: Facts) -> bool:
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        params = facts.all_params[".".join(parts[:k])]
        if params:
            return not any(step.requires_grad[p] for p in params)
    return False


def random_in_train_mode(fwd: Event, facts: Facts) -> bool:
    """Some module that is random in train mode (Dropout, or Hugging Face style dropout
    above 0) is in train mode: not BatchNorm's statistics, not TrainOnlyScale."""
    return any(fwd.training[n] for n, k in facts.kinds.items() if k == "dropout" or (k == "custom" and facts.random[n]))


#: No_grad forwards of a model never trained, each after a backward or step of the
#: program, with Dropout active, before MG201 calls it a teacher with random targets.
TEACHER_STEPS = 3


def expect_eval_in_train_mode(events, facts: Facts) -> Optional[bool]:
    """MG201, all three ways. No_grad forwards evaluating in train mode, in a row: no
    grad-enabled forward, backward or step in between. Grad-enabled forwards evaluating in
    train mode whose graphs were freed unused, with no backward or step in between (with
    every forward followed, two are enough; a graph still alive at report time does not
    count: see unused_graphs). A model never trained whose no_grad forwards in train mode,
    with Dropout active, come after TEACHER_STEPS backwards or steps (a teacher). Monte-Carlo
    dropout forwards count in a run but are not reported."""
    nograd = unused = teacher = 0
    trained = activity = False
    for ev in events:
        if ev.frees is not None and evaluating_in_train_mode(events[ev.frees], facts):
            unused += 1
            if unused >= streak_needed(trained) and not mc_dropout(events[ev.frees], facts):
                return True
        if ev.forward and not ev.grad:
            if not evaluating_in_train_mode(ev, facts):
                nograd = 0
                continue
            nograd += 1
            if nograd >= streak_needed(trained):
                if not mc_dropout(ev, facts):
                    return True
            elif not trained and random_in_train_mode(ev, facts) and (activity or teacher == 0):
                teacher, activity = teacher + 1, False
                if teacher >= TEACHER_STEPS and not mc_dropout(ev, facts):
                    return True
        elif ev.forward or ev.uses is not None or ev.op[0] == "step":
            nograd = 0
        if ev.uses is not None or ev.op[0] == "step":
            unused = 0
            trained = trained or ev.uses is not None
            activity = True
    return False


def expect_frozen_bn_drift(events, facts: Facts) -> Optional[bool]:
    """MG301: a step applies a forward in which a BatchNorm with running statistics and
    affine parameters, all frozen, was in train mode. requires_grad flips have no hook:
    modeguard re-reads them when it rebuilds its snapshot (watch(), the first forward
    after a mode change) and every 64 steps, so where a BatchNorm's frozen state changed
    between that re-read and the step, either answer is allowed (None)."""
    bns = [n for n, k in facts.kinds.items() if k == "batchnorm" and facts.own_params[n]]
    rereads = snapshot_rebuilds(events)
    verdict: Optional[bool] = False
    for j, i in applied_steps(events):
        since = max(r for r in rereads if r <= i)
        for name in bns:
            if not events[i].training[name]:
                continue
            seen = {not any(events[k].requires_grad[p] for p in facts.own_params[name]) for k in range(since, j + 1)}
            if seen == {True}:
                return True
            if len(seen) > 1:
                verdict = None
    return verdict


def snapshot_rebuilds(events) -> List[int]:
    """Where modeguard reads the modules afresh: at watch() (event 0) and at the first
    forward after any flag changed."""
    points, changed = [0], False
    for k in range(1, len(events)):
        changed = changed or events[k].training != events[k - 1].training
        if events[k].forward and changed:
            points.append(k)
            changed = False
    return points


def unused_graphs(run: Run) -> List[int]:
    """Forwards whose graphs were freed without a backward before the report. A graph
    still alive at report time (``run.pending``) is not counted today."""
    return [ev.frees for ev in run.events if ev.frees is not None]


def expect_eval_graph_unused(run: Run) -> bool:
    """MG401: a grad-enabled forward with the root in eval built a graph no backward used."""
    return any(not run.events[f].training[""] for f in unused_graphs(run))


def expect_step_without_backward(events) -> bool:
    """MG602: a step with no backward since the previous step (or since watch()). Exact
    at the default settings: the step reads the gradients."""
    backward = False
    for ev in events:
        if ev.uses is not None:
            backward = True
        elif ev.op[0] == "step":
            if not backward:
                return True
            backward = False
    return False


def expect_dropout_ignoring_eval(events, facts: Facts) -> bool:
    """MG202: never, here. The trees' only dropout that ignores eval, DropoutIgnoringEval,
    writes ``training=True`` at its call site, which is Monte-Carlo dropout on purpose
    (tests/test_rule_dropout_ignores_eval.py covers the calls MG202 reports)."""
    return False


def expected_codes(run: Run, facts: Facts) -> Dict[str, Optional[bool]]:
    """Each rule's verdict: True (must be reported), False (must not), None (either)."""
    ev = run.events
    return {
        "MG101": any(expect_step_in_eval(ev, facts).values()),
        "MG201": expect_eval_in_train_mode(ev, facts),
        "MG202": expect_dropout_ignoring_eval(ev, facts),
        "MG301": expect_frozen_bn_drift(ev, facts),
        "MG401": expect_eval_graph_unused(run),
        "MG602": expect_step_without_backward(ev),
    }


# ---- the test ---------------------------------------------------------------------------


def _hooks_left(model: nn.Module, opt) -> list:
    left = [name for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    if opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks:
        left.append("optimizer")
    return left


def _global_hooks():
    reg = nn.modules.module
    return (dict(reg._global_module_registration_hooks), dict(reg._global_parameter_registration_hooks),
            dict(reg._global_forward_pre_hooks), dict(reg._global_forward_hooks))


def _make_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def run_watched(program: Program, model: nn.Module, opt, facts: Facts):
    """The program under modeguard, reading the findings after every op (and clearing
    them, so each names its own modules) and checking ``mode_map()`` against the real
    flags there. Returns the run and ``[(op index, code, modules)]``."""
    found: List[Tuple[int, str, tuple]] = []
    guard = modeguard.watch(model, opt, on_violation="record", backward_sample=BACKWARD_SAMPLE)

    def read(k):
        found.extend((k, v.code, tuple(v.modules)) for v in guard.violations)
        guard.clear()
        rows = [(row["name"], row["training"], row["sensitive"] is not None) for row in guard.mode_map().rows]
        real = [(n, m.training, facts.kinds[n] is not None) for n, m in model.named_modules()]
        assert rows == real, f"mode_map() after op {k} differs from the real flags"

    try:
        run = interpret(program, model, opt, after_op=read)
        read(len(program.ops) + 1)  # report time, with the last graph (if any) still alive
        run.pending = None
    finally:
        guard.unwatch()
    return run, found


def assert_unchanged(model, opt, run: Run, twin, truth: Run) -> None:
    """Watching changed nothing, and unwatching left nothing behind."""
    assert len(run.outputs) == len(truth.outputs)
    assert all(torch.equal(a, b) for a, b in zip(run.outputs, truth.outputs)), "an output differs from the twin's"
    assert [(e.op, e.training, e.requires_grad, e.uses, e.frees) for e in run.events] == \
           [(e.op, e.training, e.requires_grad, e.uses, e.frees) for e in truth.events]
    for (name, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs from the unwatched twin"
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.equal(a.grad, b.grad)), name
    assert not modes.is_patched()
    assert _hooks_left(model, opt) == []


def assert_findings(found, truth: Run, facts: Facts) -> None:
    """The codes reported, and MG101's modules step by step, against the reference model."""
    codes = {code for _, code, _ in found}
    expected = expected_codes(truth, facts)
    note(f"expected: {expected}, reported: {sorted(codes)}")
    for code, verdict in expected.items():
        event(f"{code}: {'either' if verdict is None else 'expected' if verdict else 'not expected'}")
    assert codes <= set(expected), f"codes the reference model does not know: {codes - set(expected)}"
    wrong = {code: verdict for code, verdict in expected.items() if verdict is not None and (code in codes) != verdict}
    assert not wrong, f"reported {sorted(codes)}, but the reference model says {wrong}"
    mg101 = {k: set(mods) for k, code, mods in found if code == "MG101"}
    for k, must in expect_step_in_eval(truth.events, facts).items():
        got = mg101.pop(k, set())
        assert got == must, f"MG101 at op {k} named {sorted(got)}; the reference model: {sorted(must)}"
    assert not mg101, f"MG101 at ops that apply no gradients: {mg101}"


def check(program: Program) -> None:
    """Run ``program`` on a twin and under modeguard; assert the invariants and the
    reference model's verdicts."""
    assert not modes.is_patched(), "a guard from before this example is still watching"
    twin, model = build(program.tree, program.seed), build(program.tree, program.seed)
    twin_opt, opt = _make_optimizer(twin), _make_optimizer(model)
    facts = facts_of(twin)
    probe = InputProbe(twin)
    try:
        truth = interpret(program, twin, twin_opt, probe=probe)
    finally:
        probe.remove()
    note(f"trace: {[(k, ev.op, ev.uses, ev.frees) for k, ev in enumerate(truth.events)]}")

    global_hooks = _global_hooks()
    run, found = run_watched(program, model, opt, facts)
    note(f"found: {found}")
    assert_unchanged(model, opt, run, twin, truth)
    assert _global_hooks() == global_hooks
    assert_findings(found, truth, facts)


# Regression cases: programs the oracle once failed on, run before the random ones.

#: A Dropout in eval after a frozen Linear, then the Linear is unfrozen with no mode
#: change: the second step trains through the Dropout in eval (once missed: the input
#: was looked at only in the first forward after a mode change).
STALE_PROBE_MISS = Program(
    tree=(("linear",), ("dropout", 0.5), ("linear",)),
    ops=(("requires_grad", 1, False), ("eval", 0), ("forward", "grad"), ("backward",), ("step",),
         ("requires_grad", 1, True), ("forward", "grad"), ("backward",), ("step",)),
)
#: ... the other way round, once a false alarm: trained through first, then the Linear
#: before it is frozen (a frozen extractor now): the second step is quiet.
STALE_PROBE_FALSE_ALARM = Program(
    tree=(("linear",), ("dropout", 0.5), ("linear",)),
    ops=(("eval", 0), ("forward", "grad"), ("backward",), ("step",),
         ("requires_grad", 1, False), ("forward", "grad"), ("backward",), ("step",)),
)
#: ... the miss as the generator found it (shrunk): the whole model frozen, so the first
#: step has no backward (MG602); unfrozen, the second step trains the Dropout in eval.
STALE_PROBE_MISS_FOUND = Program(
    tree=(("linear",), ("dropout", 0.5)),
    ops=(("requires_grad", 0, False), ("train", 0), ("train", 0), ("eval", 0), ("zero_grad",), ("forward", "grad"),
         ("backward",), ("step",), ("requires_grad", 0, True), ("zero_grad",), ("forward", "grad"), ("backward",),
         ("step",)),
)
#: One Dropout used twice, first after a frozen Linear, then after a trained one (once
#: missed: only its first call was looked at).
SHARED_PROBE_MISS = Program(
    tree=(("linear",), ("dropout", 0.5), ("linear",), ("shared", 1), ("linear",)),
    ops=(("requires_grad", 1, False), ("eval", 0), ("forward", "grad"), ("backward",), ("step",)),
)
#: An input-layer Dropout put in eval, then trained: its input never requires grad, and
#: nothing frozen lies before it (once missed: taken for part of a frozen extractor).
INPUT_DROPOUT_MISS = Program(
    tree=(("dropout", 0.5), ("linear",)),
    ops=(("eval", 1), ("zero_grad",), ("forward", "grad"), ("backward",), ("step",)),
)
#: ... and the same Dropout as the first layer of a frozen backbone: quiet.
INPUT_DROPOUT_FROZEN_BACKBONE = Program(
    tree=(("seq", (("dropout", 0.5), ("linear",))), ("linear",)),
    ops=(("requires_grad", 1, False), ("eval", 1), ("zero_grad",), ("forward", "grad"), ("backward",), ("step",)),
)


#: A skipped backward with no zero_grad() either: the stale gradients applied again
#: (once missed: the first parameter untouched, the last one not read yet).
STALE_GRADIENTS_STEPPED = Program(
    tree=(("linear",), ("linear",)),
    ops=(("zero_grad",), ("forward", "grad"), ("backward",), ("step",), ("zero_grad",), ("forward", "grad"),
         ("backward",), ("step",), ("forward", "grad"), ("step",)),
)
#: The first layer frozen, then a step twice (once missed: the parameters read were the
#: frozen ones).
STEP_TWICE_AFTER_FREEZING = Program(
    tree=(("linear",), ("linear",)),
    ops=(("zero_grad",), ("forward", "grad"), ("backward",), ("step",), ("requires_grad", 1, False), ("train", 0),
         ("zero_grad",), ("forward", "grad"), ("backward",), ("step",), ("step",)),
)
#: A model that no backward ever reaches, stepped anyway, its Dropout in train mode under
#: no_grad once per step: a teacher with random targets (MG201), and steps without a
#: backward (MG602).
TEACHER_WITH_DROPOUT = Program(
    tree=(("linear",), ("dropout", 0.5)),
    ops=(("forward", "no_grad"), ("step",), ("forward", "no_grad"), ("step",), ("forward", "no_grad"), ("step",)),
)
#: ... and with BatchNorm only in train mode (a momentum encoder): MG602 alone.
ENCODER_WITH_BATCHNORM = Program(
    tree=(("linear",), ("bn", True, True)),
    ops=(("forward", "no_grad"), ("step",), ("forward", "no_grad"), ("step",), ("forward", "no_grad"), ("step",)),
)


@settings(
    max_examples=EXAMPLES,
    deadline=5000,  # ms per example, far above the usual few; a shared machine varies
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
@given(program=programs)
@example(program=STALE_PROBE_MISS)
@example(program=STALE_PROBE_MISS_FOUND)
@example(program=STALE_PROBE_FALSE_ALARM)
@example(program=SHARED_PROBE_MISS)
@example(program=INPUT_DROPOUT_MISS)
@example(program=INPUT_DROPOUT_FROZEN_BACKBONE)
@example(program=TEACHER_WITH_DROPOUT)
@example(program=STALE_GRADIENTS_STEPPED)
@example(program=STEP_TWICE_AFTER_FREEZING)
@example(program=ENCODER_WITH_BATCHNORM)
def test_random_programs_against_the_reference_model(program):
    check(program)
