"""torch.compile: in every order (compile then watch, watch then compile, model.compile(),
automatic mode), with and without fullgraph=True, a watched model compiles to the same
graphs as an unwatched one (no graph break, no recompile) and gets the same findings as
in eager mode. Most cases use the eager backend, which runs dynamo's tracing, guards and
graph breaks as every backend does; one case runs inductor."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import modeguard
from modeguard import _auto as auto

pytestmark = pytest.mark.usefixtures("isolated")


class Net(nn.Module):
    """A user's model: its forward is user code, which dynamo compiles (torch's own
    containers are in dynamo's skip list and are not compiled as a whole)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.drop, self.fc2 = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.drop(F.relu(self.bn(self.fc1(x)))))


class CountingBackend:
    """dynamo's eager backend, counting the graphs it is handed (each compile and
    recompile of a frame is one)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


X, Y = torch.randn(16, 8, generator=torch.Generator().manual_seed(0)), torch.randint(0, 3, (16,))


def program(call, model, opt, bug: bool):
    """Train, compute a saliency map in eval (grad enabled: correct code), evaluate under
    no_grad, then train again: in train mode (correct) or still in eval (MG101)."""
    def step():
        opt.zero_grad()
        F.cross_entropy(call(X), Y).backward()
        opt.step()

    for _ in range(3):
        step()
    model.eval()
    x = X.clone().requires_grad_(True)
    call(x).sum().backward()
    with torch.no_grad():
        call(X)
    if not bug:
        model.train()
    for _ in range(3):
        step()


def compiled_run(order: str, fullgraph: bool, bug: bool, watched: bool = True):
    """Runs ``program`` compiled in ``order``; returns (findings, graphs, graph breaks)."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    backend = CountingBackend()
    guard = None
    if watched and order.startswith("watch"):
        guard = modeguard.watch(model, opt, on_violation="record")
    if "torch.compile" in order:
        call = torch.compile(model, backend=backend, fullgraph=fullgraph)
    else:
        model.compile(backend=backend, fullgraph=fullgraph)
        call = model
    if watched and not order.startswith("watch"):
        # The wrapper torch.compile returned, or the model itself (its wrapper is found).
        guard = modeguard.watch(model if order.endswith("model itself") else call, opt, on_violation="record")
    try:
        program(call, model, opt, bug)
        found = [(v.code, v.model, v.modules) for v in guard.violations] if guard else []
    finally:
        if guard is not None:
            guard.unwatch()
    return found, backend.graphs, sum(counters["graph_break"].values()), call, model


ORDERS = ["watch, then torch.compile", "torch.compile, then watch", "torch.compile, then watch the model itself",
          "watch, then model.compile", "model.compile, then watch"]


@pytest.fixture(scope="module")
def unwatched_graphs():
    """(graphs, graph breaks) of the unwatched program, by (fullgraph, bug)."""
    return {(fg, bug): compiled_run("torch.compile", fg, bug=bug, watched=False)[1:3]
            for fg, bug in ((True, False), (False, True))}


# Correct code with fullgraph=True (any graph break would fail it), the bug without it:
# each order both ways would compile twice as much for no more coverage of modeguard.
@pytest.mark.parametrize("fullgraph", [True])
@pytest.mark.parametrize("order", ORDERS)
def test_correct_code_compiles_the_same_graphs_and_stays_quiet(order, fullgraph, unwatched_graphs):
    found, graphs, breaks, _, _ = compiled_run(order, fullgraph, bug=False)
    assert found == []
    assert (graphs, breaks) == unwatched_graphs[fullgraph, False]
    assert breaks == 0


@pytest.mark.parametrize("fullgraph", [False])
@pytest.mark.parametrize("order", ORDERS)
def test_training_in_eval_is_found_as_in_eager_mode(order, fullgraph, unwatched_graphs):
    found, graphs, breaks, _, _ = compiled_run(order, fullgraph, bug=True)
    # The model's own module names, no "_orig_mod." prefix; the same as in eager mode.
    assert found == [("MG101", "Net", ["bn", "drop"])] == eager_findings()
    assert (graphs, breaks) == unwatched_graphs[fullgraph, True]


def eager_findings():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        program(model, model, opt, bug=True)
        return [(v.code, v.model, v.modules) for v in guard.violations]


@pytest.mark.parametrize("order", ORDERS)
def test_unwatch_leaves_no_trace_on_the_compiled_model(order):
    _, _, _, call, model = compiled_run(order, False, bug=True)
    for m in {id(call): call, id(model): model}.values():
        assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())
    if "model.compile" in order:
        # Torch's own compiled callable is back in place.
        assert getattr(model._compiled_call_impl, "__name__", "") != "modeguard_compiled_call"
    call(X)  # still runs


def test_a_compiled_watched_model_pickles_and_copies():
    import copy
    import pickle

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with modeguard.watch(model, opt, on_violation="record"):
        model.compile(backend="eager")
        model(X)
        twin = copy.deepcopy(model)
        again = pickle.loads(pickle.dumps(model))
        assert set(twin.state_dict()) == set(model.state_dict()) == set(again.state_dict())
        twin.eval(), model.eval()
        assert torch.equal(twin(X), model(X))
        assert not twin._forward_hooks and "_compiled_call_impl" not in again.__dict__


def _auto_run(fn):
    guard = auto.start(on_violation="record")
    try:
        fn()
    finally:
        auto.stop()
    return [(v.code, v.model, v.modules) for v in guard.violations]


@pytest.mark.parametrize("style", ["torch.compile", "model.compile"])
def test_automatic_mode_finds_the_bug_in_a_compiled_model_with_the_same_graphs(style, unwatched_graphs):
    def run():
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        backend = CountingBackend()
        if style == "torch.compile":
            call = torch.compile(model, backend=backend)
        else:
            model.compile(backend=backend)
            call = model
        program(call, model, opt, bug=True)
        graphs.append((backend.graphs, sum(counters["graph_break"].values())))

    graphs = []
    assert _auto_run(run) == [("MG101", "Net", ["bn", "drop"])]
    assert graphs == [unwatched_graphs[False, True]]


@pytest.mark.parametrize("mode", ["watch", "auto"])
def test_a_compiled_training_step_function_runs_as_unwatched(mode):
    # torch.compile(train_step): the forward and the step hooks are traced as part of the
    # user's function. modeguard stays out of it (nothing inside is looked at).
    def run(watch: bool):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        backend = CountingBackend()
        guard = modeguard.watch(model, opt, on_violation="record") if watch else None

        @torch.compile(backend=backend)
        def step(x, y):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

        try:
            for _ in range(3):
                step(X, Y)
        finally:
            if guard is not None:
                guard.unwatch()
        return backend.graphs, sum(counters["graph_break"].values()), [p.detach().clone() for p in model.parameters()]

    base = run(False)
    got = run(True) if mode == "watch" else None
    if mode == "auto":
        out = []
        _auto_run(lambda: out.append(run(False)))
        got = out[0]
    assert got[:2] == base[:2]
    assert all(torch.equal(a, b) for a, b in zip(got[2], base[2]))


@pytest.mark.parametrize("how", ["assign", "eval"])
@pytest.mark.parametrize("fullgraph", [False, True])
def test_mode_changes_inside_compiled_code_compile_as_unwatched(how, fullgraph):
    # A compiled function that switches a module's mode (`drop.training = False`,
    # `drop.eval()`) traces modeguard's setter and train(): they stay out of the graph,
    # with fullgraph=True too, and add no graph break.
    def run(watch: bool):
        torch._dynamo.reset()
        counters.clear()
        drop = nn.Dropout(0.5)
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        backend = CountingBackend()
        guard = modeguard.watch(model, opt, on_violation="record") if watch else None

        @torch.compile(backend=backend, fullgraph=fullgraph)
        def switched(x):
            if how == "assign":
                drop.training = False
            else:
                drop.eval()
            return drop(x) * 2

        try:
            out = switched(torch.ones(2, 4))
        finally:
            if guard is not None:
                guard.unwatch()
        return backend.graphs, sum(counters["graph_break"].values()), out, drop.training

    base, got = run(False), run(True)
    assert got[:2] == base[:2] and torch.equal(got[2], base[2]) and got[3] is base[3] is False


def test_inductor_compiled_evaluation_in_train_mode_is_found():
    # One case through inductor (generated C++ kernels): no_grad evaluations in train
    # mode, the quickest graphs for it to compile (no backward).
    torch._dynamo.reset()
    model = Net()
    with modeguard.watch(model, on_violation="record") as guard:
        call = torch.compile(model, backend="inductor")
        with torch.no_grad():
            outs = [call(X) for _ in range(3)]
        found = [(v.code, v.modules) for v in guard.violations]
    assert found == [("MG201", ["bn", "drop"])]
    assert outs[0].shape == (16, 3)


@pytest.mark.parametrize("strict", [True, False])
def test_torch_export_of_a_watched_model_holds_nothing_of_modeguards(strict):
    # torch.export traces the model's forward with its hooks: under dynamo (strict) and
    # under torch's own tracing with the compiling flag set (non-strict), the hooks stay
    # out, so the exported program is the unwatched model's, and the export is no forward.
    model = Net().eval()
    guard = modeguard.watch(model)
    try:
        exported = torch.export.export(model, (X,), strict=strict)
        targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
        assert not any("modeguard" in t for t in targets)
        with torch.no_grad():
            torch.testing.assert_close(exported.module()(X), model(X))
        assert list(guard.violations) == [] and guard.root_state(model).fwd_seq == 0
    finally:
        guard.unwatch()
