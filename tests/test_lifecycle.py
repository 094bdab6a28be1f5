"""A watched model behaves exactly as before, and unwatch() (or the model's death) leaves
nothing of modeguard behind: outputs and gradients, deepcopy, torch.save, pickle,
state_dict, odd output structures, weight sharing, shared modules, train() overrides, and
weak references to models and activations."""

import collections
import copy
import dataclasses
import gc
import io
import pickle
import weakref

import pytest
import torch
import torch.nn as nn
import wrapt

import modeguard
from modeguard._guard import guard_of
from modeguard.observe import modes
from modeguard.observe.modes import HOOK_MARK


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.drop(torch.relu(self.bn(self.fc(x)))))


Pair = collections.namedtuple("Pair", "logits aux")


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    extra: int = 0


class Structured(nn.Module):
    """Returns its prediction in the structure named by ``kind``."""

    def __init__(self, kind):
        super().__init__()
        self.net = Net()
        self.kind = kind

    def forward(self, x):
        y = self.net(x)
        return {
            "tensor": lambda: y,
            "tuple": lambda: (y, y.detach()),
            "list": lambda: [y * 2, 1],
            "dict": lambda: {"logits": y, "n": 3},
            "nested": lambda: {"a": [(None, {"b": y})]},
            "dataclass": lambda: Output(y),
            "namedtuple": lambda: Pair(y, None),
            "none": lambda: None,
        }[self.kind]()


def _logits(out, kind):
    return {
        "tensor": lambda: out,
        "tuple": lambda: out[0],
        "list": lambda: out[0],
        "dict": lambda: out["logits"],
        "nested": lambda: out["a"][0][1]["b"],
        "dataclass": lambda: out.logits,
        "namedtuple": lambda: out.logits,
    }[kind]()


def _x(n=6):
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(1))


def _no_modeguard_hooks(module: nn.Module) -> bool:
    for m in module.modules():
        for d in (m._forward_pre_hooks, m._forward_hooks):
            if any(getattr(fn, HOOK_MARK, False) for fn in d.values()):
                return False
    return True


def _all_hook_dicts_empty(module: nn.Module) -> bool:
    return all(
        not d
        for m in module.modules()
        for d in (
            m._forward_pre_hooks, m._forward_hooks, m._backward_hooks, m._backward_pre_hooks,
            m._forward_pre_hooks_with_kwargs, m._forward_hooks_with_kwargs,
        )
    )


def _optimizer_hooks_empty(opt) -> bool:
    return not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


@pytest.fixture(autouse=True)
def _nothing_left(monkeypatch):
    monkeypatch.delenv("MODEGUARD", raising=False)
    yield
    assert not modes.is_patched(), "a test left a guard watching"


# ---- same numbers -------------------------------------------------------------------------


def _run(model, opt, steps=3, seed=0):
    """A few training steps and an eval forward; returns everything numeric."""
    torch.manual_seed(seed)
    outs, grads = [], []
    for i in range(steps):
        opt.zero_grad()
        out = model(_x())
        out.pow(2).mean().backward()
        outs.append(out.detach().clone())
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    model.eval()
    with torch.no_grad():
        outs.append(model(_x()))
    model.train()
    return outs, grads, {k: v.clone() for k, v in model.state_dict().items()}


def test_watched_model_gives_identical_outputs_gradients_and_state():
    torch.manual_seed(0)
    plain = Net()
    watched = copy.deepcopy(plain)
    o1 = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    o2 = torch.optim.SGD(watched.parameters(), lr=0.1, momentum=0.9)
    ref = _run(plain, o1)
    with modeguard.watch(watched, o2, on_violation="raise") as guard:
        got = _run(watched, o2)
        assert guard.violations == []
    for a, b in zip(ref[0], got[0]):
        assert torch.equal(a, b)
    for ga, gb in zip(ref[1], got[1]):
        for a, b in zip(ga, gb):
            assert torch.equal(a, b)
    assert ref[2].keys() == got[2].keys()
    for k in ref[2]:
        assert torch.equal(ref[2][k], got[2][k]), k


def test_hooks_keep_users_own_hooks_working():
    model = Net()
    seen = []
    model.register_forward_hook(lambda m, a, o: seen.append("post"))
    model.register_forward_pre_hook(lambda m, a: seen.append("pre"))
    with modeguard.watch(model):
        model(_x())
    assert seen == ["pre", "post"]
    assert len(model._forward_hooks) == 1 and len(model._forward_pre_hooks) == 1


# ---- copies and serialisation ---------------------------------------------------------------


def _exercise(model, opt):
    """Grad-enabled forwards in eval mode install modeguard's probe hooks on submodules too."""
    opt.zero_grad()
    model(_x()).sum().backward()
    opt.step()
    model.eval()
    model(_x()).sum().backward()
    model.train()


def test_deepcopy_while_watched_carries_no_hooks_and_no_guard():
    model = Net()
    model.drop.register_forward_hook(lambda m, a, o: None)  # the user's own: kept
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        _exercise(model, opt)
        assert not _no_modeguard_hooks(model)
        clone = copy.deepcopy(model)
        assert _no_modeguard_hooks(clone)
        assert len(clone.drop._forward_hooks) == 1
        assert guard_of(clone) is None
        assert guard.models == [model]
        # The original is still watched, with its hooks intact.
        assert not _no_modeguard_hooks(model)
        # The copy runs, unwatched: a step in eval mode on it reports nothing.
        copt = torch.optim.SGD(clone.parameters(), lr=0.1)
        clone.eval()
        copt.zero_grad()
        clone(_x()).sum().backward()
        copt.step()
        assert [v.code for v in guard.violations if v.code == "MG101"] == []
        # Watching the copy installs its own hooks once.
        g2 = modeguard.watch(clone, copt, on_violation="record")
        assert g2 is not guard
        assert len(clone._forward_pre_hooks) == 1 and len(clone._forward_hooks) == 1
        g2.unwatch()
    assert _all_hook_dicts_empty(clone.fc) and _no_modeguard_hooks(clone)
    assert _no_modeguard_hooks(model)


def test_deepcopy_equal_numbers():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with modeguard.watch(model, opt):
        _exercise(model, opt)
        clone = copy.deepcopy(model)
    model.eval(), clone.eval()
    with torch.no_grad():
        assert torch.equal(model(_x()), clone(_x()))


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_serialising_while_watched(how):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with modeguard.watch(model, opt, on_violation="record"):
        _exercise(model, opt)
        if how == "torch.save":
            buf = io.BytesIO()
            torch.save(model, buf)
            buf.seek(0)
            loaded = torch.load(buf, weights_only=False)
        else:
            loaded = pickle.loads(pickle.dumps(model))
        assert _no_modeguard_hooks(loaded)
        assert _all_hook_dicts_empty(loaded)
        assert guard_of(loaded) is None
    loaded.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(_x()), model(_x()))


class OwnGetstate(Net):
    """A class whose __getstate__ does not call nn.Module's (as nn.LSTM's does not)."""

    def __getstate__(self):
        return self.__dict__.copy()


@pytest.mark.parametrize("make", [OwnGetstate, lambda: nn.LSTM(4, 4, num_layers=2, dropout=0.2)], ids=["own-getstate", "lstm"])
def test_copies_of_classes_with_their_own_getstate(make):
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = _x() if isinstance(model, Net) else _x().view(3, 2, 4)
    with modeguard.watch(model, opt, on_violation="record"):
        model.eval()
        out = model(x)
        (out if isinstance(out, torch.Tensor) else out[0]).sum().backward()
        clone = copy.deepcopy(model)
        assert _no_modeguard_hooks(clone) and guard_of(clone) is None
        loaded = pickle.loads(pickle.dumps(model))
        assert _no_modeguard_hooks(loaded)
        assert not _no_modeguard_hooks(model)
    assert "__reduce_ex__" not in nn.Module.__dict__


def test_state_dict_round_trip_while_watched():
    model, other = Net(), Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with modeguard.watch(model, opt, on_violation="record"), modeguard.watch(other, on_violation="record"):
        _exercise(model, opt)
        sd = model.state_dict()
        assert not any("modeguard" in k for k in sd)
        assert set(sd) == set(Net().state_dict())
        result = other.load_state_dict(sd)
        assert not result.missing_keys and not result.unexpected_keys
        # Loading into the watched model itself works too.
        model.load_state_dict(copy.deepcopy(sd))
        opt.load_state_dict(opt.state_dict())
        model.eval(), other.eval()
        with torch.no_grad():
            assert torch.equal(model(_x()), other(_x()))


# ---- odd outputs, weight sharing, shared modules, overrides -------------------------------------


@pytest.mark.parametrize("kind", ["tensor", "tuple", "list", "dict", "nested", "dataclass", "namedtuple"])
def test_outputs_of_any_structure_are_tracked(kind):
    model = Structured(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for _ in range(2):
            opt.zero_grad()
            _logits(model(_x()), kind).sum().backward()
            opt.step()
        assert guard.violations == []
        model.eval()
        opt.zero_grad()
        _logits(model(_x()), kind).sum().backward()  # a backward through the structure is seen
        opt.step()
        assert [v.code for v in guard.violations] == ["MG101"]


def test_output_none_is_fine():
    model = Structured("none")
    with modeguard.watch(model, on_violation="raise") as guard:
        assert model(_x()) is None
        model.eval()
        assert model(_x()) is None
        with torch.no_grad():
            assert model(_x()) is None
        assert guard.violations == []


def test_output_without_grad_is_fine():
    class Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Net()

        def forward(self, x):
            return self.net(x).argmax(1), "label"

    model = Detached()
    with modeguard.watch(model, on_violation="raise") as guard:
        for _ in range(3):
            idx, label = model(_x())
        assert label == "label" and idx.shape == (6,)
        assert guard.violations == []


class Siamese(nn.Module):
    """One block called twice per forward (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.block = Net()
        self.proj = nn.Linear(2, 4)

    def forward(self, x):
        return self.block(self.proj(self.block(x)))


def test_module_called_several_times_per_step():
    model = Siamese()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for _ in range(3):
            opt.zero_grad()
            model(_x()).sum().backward()
            opt.step()
        assert guard.violations == []
        model.block.eval()
        opt.zero_grad()
        model(_x()).sum().backward()
        opt.step()
        (v,) = guard.violations
        assert v.code == "MG101"
        assert set(v.modules) == {"block.bn", "block.drop"}


def test_shared_submodule_called_directly_and_through_root():
    """The root's own submodule used on its own (a root is a root, its parts are not)."""
    model = Siamese()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for _ in range(3):
            opt.zero_grad()
            (model(_x()).sum() + model.block(_x()).sum()).backward()
            opt.step()
        assert guard.violations == []


def test_module_shared_between_two_watched_models():
    encoder = Net()
    a = nn.Sequential(encoder, nn.Linear(2, 2))
    b = nn.Sequential(encoder, nn.Linear(2, 3))
    oa = torch.optim.SGD(a.parameters(), lr=0.1)
    ob = torch.optim.SGD(b.parameters(), lr=0.1)
    ga = modeguard.watch(a, oa, on_violation="record")
    gb = modeguard.watch(b, ob, on_violation="record")
    try:
        assert ga is not gb
        for _ in range(3):
            for m, o in ((a, oa), (b, ob)):
                o.zero_grad()
                m(_x()).sum().backward()
                o.step()
        assert ga.violations == [] and gb.violations == []
        b.eval()  # also puts the shared encoder of `a` in eval
        a[1].train()
        oa.zero_grad()
        a(_x()).sum().backward()
        oa.step()
        (v,) = ga.violations
        assert v.code == "MG101" and set(v.modules) == {"0.bn", "0.drop"}
        assert gb.violations == []
        ga.unwatch()
        assert not _no_modeguard_hooks(b) and modes.is_patched()
        # b is still watched after a's guard is gone.
        ob.zero_grad()
        b(_x()).sum().backward()
        ob.step()
        assert [v.code for v in gb.violations] == ["MG101"]
    finally:
        ga.unwatch()
        gb.unwatch()
    assert _no_modeguard_hooks(a) and _no_modeguard_hooks(b)


class FreezableBN(Net):
    """A train() override with another signature (detectron/mmdet style)."""

    def train(self, mode=True, freeze_bn=False):
        super().train(mode)
        if freeze_bn:
            self.bn.eval()
        return self


class Passthrough(Net):
    def train(self, *args, **kwargs):
        return super().train(*args, **kwargs)


def _step(model, opt):
    opt.zero_grad()
    model(_x()).sum().backward()
    opt.step()


def test_train_override_with_other_signature_does_not_crash():
    model = FreezableBN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with modeguard.watch(model, opt, on_violation="raise") as guard:
        assert model.train(True, freeze_bn=True) is model
        assert model.train(mode=True, freeze_bn=True) is model
        assert not model.bn.training and model.drop.training
        _step(model, opt)  # the override put bn in eval on purpose: silent
        assert guard.violations == []
        site = modes.last_set(model.bn)
        assert site.how == "override" and site.by == "FreezableBN"
        assert model.train() is model and model.bn.training
        _step(model, opt)
        assert model.eval() is model
        with pytest.raises(modeguard.StepInEvalError):
            _step(model, opt)


def test_passthrough_train_override_is_not_taken_for_intentional():
    model = Passthrough()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.eval()
        _step(model, opt)
        (v,) = guard.violations
        assert v.code == "MG101"
        assert v.mode_set_at.how == "Passthrough.eval()"
        assert v.mode_set_at.location.file == __file__
        assert v.mode_set_at.location.function == "test_passthrough_train_override_is_not_taken_for_intentional"


# ---- nothing left behind -------------------------------------------------------------------


def test_unwatch_leaves_no_hook_patch_or_reference():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = modeguard.watch(model, opt, on_violation="record")
    _exercise(model, opt)
    model.eval()
    model(_x())  # a graph freed later, with nothing to drain it until unwatch
    model.train()
    guard.unwatch()
    assert not modes.is_patched()
    for name in ("train", "__setattr__", "__getstate__"):
        assert not isinstance(nn.Module.__dict__[name], wrapt.ObjectProxy), name
        assert not getattr(nn.Module.__dict__[name], "__modeguard_patch__", False), name
    assert "training" not in nn.Module.__dict__  # the flag's setter is gone with the patches
    assert _all_hook_dicts_empty(model)
    assert _optimizer_hooks_empty(opt)
    assert guard_of(model) is None and guard.models == []
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_guard_does_not_keep_a_watched_model_alive():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = modeguard.watch(model, opt, on_violation="record")
    try:
        _exercise(model, opt)
        model.eval()
        out = model(_x())
        model.train()
        _step(model, opt)
        ref = weakref.ref(model)
        del model, out
        gc.collect()
        assert ref() is None
        assert guard.models == []
        # The optimizer (which outlives the model) keeps working.
        _step_params_only(opt)
    finally:
        guard.unwatch()
    assert _optimizer_hooks_empty(opt)


def _step_params_only(opt):
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()


def test_deleting_a_watched_model_with_its_optimizer():
    model = Net()
    opt = torch.optim.Adam(model.parameters())
    guard = modeguard.watch(model, opt)
    _exercise(model, opt)
    refs = weakref.ref(model), weakref.ref(opt)
    del model, opt
    gc.collect()
    assert all(r() is None for r in refs)
    guard.unwatch()


def test_activations_are_not_kept_alive():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with modeguard.watch(model, opt, on_violation="record"):
        refs = []
        for mode in ("train", "eval"):
            getattr(model, mode)()
            out = model(_x())
            refs.append(weakref.ref(out))
            out.sum().backward()
            refs.append(weakref.ref(out))
            del out
            with torch.no_grad():
                out = model(_x())
            refs.append(weakref.ref(out))
            del out
            out = model(_x())  # never backpropagated
            refs.append(weakref.ref(out))
            del out
        gc.collect()
        assert all(r() is None for r in refs)


def test_watched_model_and_guard_survive_gc_cycle_while_in_use():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        gc.collect()
        model.eval()
        _step(model, opt)
        assert [v.code for v in guard.violations] == ["MG101"]


# ---- unwatch() cannot raise, and a dropped guard is freed -----------------------------------


def _eval_graph_freed_unused(model):
    """An eval-mode forward with grad enabled whose graph is freed before any hook runs
    again: its finding waits to be drained (by the next hook, a report or unwatch())."""
    model.eval()
    out = model(_x())
    del out
    model.train()


def test_unwatch_in_raise_mode_cleans_up_and_keeps_the_finding():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = modeguard.watch(model, opt, on_violation="raise", rules={"MG401": "error"})
    _eval_graph_freed_unused(model)
    guard.unwatch()  # the drained MG401 would raise here; it is recorded instead
    assert [v.code for v in guard.violations] == ["MG401"]
    assert not guard.active and not modes.is_patched()
    assert _all_hook_dicts_empty(model) and _optimizer_hooks_empty(opt)
    assert guard_of(model) is None
    guard.unwatch()  # still nothing to do, and nothing raised


def test_reading_violations_and_report_never_raises(recwarn):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with modeguard.watch(model, opt, on_violation="raise", rules={"MG401": "error"}) as guard:
        _eval_graph_freed_unused(model)
        assert [v.code for v in guard.violations] == ["MG401"]
        _eval_graph_freed_unused(model)
        report = guard.report()
        assert [v.code for v in report] == ["MG401"] and report.violations[0].count == 2


def test_unwatch_under_warnings_as_errors():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = modeguard.watch(model, opt, on_violation="warn")
    _eval_graph_freed_unused(model)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as under `python -W error`
        guard.unwatch()
    assert [v.code for v in guard.violations] == ["MG401"]
    assert not modes.is_patched() and _all_hook_dicts_empty(model)


def test_dropped_guards_are_freed_and_the_patches_go_with_the_last():
    refs = []
    for _ in range(200):
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        refs.append(weakref.ref(modeguard.watch(model, opt, on_violation="record")))
        _step(model, opt)
        del model, opt
    assert modes.is_patched()
    gc.collect()
    assert all(r() is None for r in refs), "a dropped guard is still alive"
    assert modes.ON_EPOCH == {}, "mode changes still call dropped guards"
    assert not modes.is_patched(), "nn.Module still patched with no guard alive"


def test_a_guard_kept_alive_by_its_model_keeps_watching():
    # `modeguard.watch(model, opt)` with the guard not kept: the model's hook holds it.
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    modeguard.watch(model, opt, on_violation="record")
    gc.collect()
    guard = guard_of(model)
    assert guard is not None and modes.is_patched()
    model.eval()
    _step(model, opt)
    assert [v.code for v in guard.violations] == ["MG101"]
    guard.unwatch()


def test_nested_with_on_the_same_model_leaves_the_outer_guard_on():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with modeguard.watch(model, opt, on_violation="record") as outer:
        with modeguard.watch(model, opt, on_violation="record") as inner:
            assert inner is outer
        assert outer.active and guard_of(model) is outer
        model.eval()
        _step(model, opt)
        assert [v.code for v in outer.violations] == ["MG101"]
    assert not outer.active and not modes.is_patched()


def test_with_on_an_already_watched_model_leaves_that_guard_on():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = modeguard.watch(model, opt, on_violation="record")
    with modeguard.watch(model):
        pass
    assert guard.active
    # A watch() call inside the block that adds an optimizer does not change who ends it.
    second = Net()
    with modeguard.watch(second, on_violation="record") as other:
        modeguard.watch(second, torch.optim.SGD(second.parameters(), lr=0.1), on_violation="record")
    assert not other.active
    guard.unwatch()
