"""frozen() / unfreeze() / allow(): what the user declares on purpose."""

import warnings

import pytest
import torch
import torch.nn as nn

import modeguard
from modeguard.observe import modes, sensitivity


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.drop(self.backbone(x)))


def _x():
    return torch.randn(6, 4, generator=torch.Generator().manual_seed(0))


def _step(model, opt):
    opt.zero_grad()
    model(_x()).sum().backward()
    opt.step()


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv("MODEGUARD", raising=False)
    yield
    assert not modes.is_patched()


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt


# ---- frozen / unfreeze -------------------------------------------------------------------------


def test_backbone_bn_in_eval_with_trainable_params_fires(setup):
    model, opt = setup
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.backbone.eval()
        _step(model, opt)
        assert [(v.code, v.modules) for v in guard.violations] == [("MG101", ["backbone.1"])]


def test_frozen_marks_module_and_everything_under_it(setup):
    model, opt = setup
    assert modeguard.frozen(model.backbone) is model.backbone
    try:
        assert sensitivity.is_marked_frozen(model.backbone)
        with modeguard.watch(model, opt, on_violation="record") as guard:
            model.backbone.eval()
            for _ in range(3):
                _step(model, opt)
            assert guard.violations == []
            rows = {r["name"]: r for r in guard.mode_map().rows}
            assert rows["backbone"]["frozen"] and rows["backbone.1"]["frozen"] and rows["backbone.0"]["frozen"]
            assert not rows["head"]["frozen"]
    finally:
        modeguard.unfreeze(model.backbone)
    assert not sensitivity.is_marked_frozen(model.backbone)


def test_unfreeze_takes_the_mark_back_while_watched(setup):
    model, opt = setup
    modeguard.frozen(model.backbone)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.backbone.eval()
        _step(model, opt)
        assert guard.violations == []
        modeguard.unfreeze(model.backbone)  # takes effect at the next forward
        _step(model, opt)
        assert [v.code for v in guard.violations] == ["MG101"]


def test_frozen_marks_do_not_leak_to_other_modules(setup):
    model, opt = setup
    other = Net()
    modeguard.frozen(other.backbone)
    try:
        with modeguard.watch(model, opt, on_violation="record") as guard:
            model.backbone.eval()
            _step(model, opt)
            assert [v.code for v in guard.violations] == ["MG101"]
    finally:
        modeguard.unfreeze(other.backbone)


def test_frozen_argument_to_watch_modules_and_patterns(setup):
    model, opt = setup
    with modeguard.watch(model, opt, on_violation="record", frozen=[model.backbone]) as guard:
        model.backbone.eval()
        _step(model, opt)
        assert guard.violations == []
    # The guard's frozen= marks end with it.
    assert not sensitivity.is_marked_frozen(model.backbone)
    with modeguard.watch(model, opt, on_violation="record", frozen=["backbone.*"]) as guard:
        _step(model, opt)
        assert guard.violations == []
    with modeguard.watch(model, opt, on_violation="record", frozen=["head*"]) as guard:
        _step(model, opt)
        assert [v.code for v in guard.violations] == ["MG101"]  # the pattern does not cover backbone


def test_frozen_rejects_bad_input():
    with pytest.raises(TypeError, match="at least one"):
        modeguard.frozen()
    with pytest.raises(TypeError, match="nn.Module"):
        modeguard.frozen("backbone")
    with pytest.raises(TypeError, match="backbone"):
        modeguard.watch(nn.Linear(2, 2), frozen=[3])
    assert not modes.is_patched()


def test_frozen_as_one_string_is_one_pattern(setup):
    model, opt = setup
    # "head*" iterated character by character would give the pattern "*", freezing all.
    with modeguard.watch(model, opt, on_violation="record", frozen="head*") as guard:
        model.backbone.eval()
        _step(model, opt)
        assert [(v.code, v.modules) for v in guard.violations] == [("MG101", ["backbone.1"])]
    with modeguard.watch(model, opt, on_violation="record", frozen="backbone.*") as guard:
        _step(model, opt)
        assert guard.violations == []


def test_frozen_as_one_module(setup):
    model, opt = setup
    with modeguard.watch(model, opt, on_violation="record", frozen=model.backbone) as guard:
        model.backbone.eval()
        _step(model, opt)
        assert guard.violations == []
    assert not sensitivity.is_marked_frozen(model.backbone)


@pytest.mark.parametrize("bad", [3, 2.5, object()])
def test_frozen_argument_of_another_type_names_what_it_accepts(bad):
    with pytest.raises(TypeError, match=r"frozen= expects an nn.Module, a name pattern.*got"):
        modeguard.watch(nn.Linear(2, 2), frozen=bad)
    assert not modes.is_patched()


def test_unfreeze_rejects_what_is_not_a_module():
    with pytest.raises(TypeError, match=r"unfreeze\(\) expects nn.Module objects.*got builtins.str"):
        modeguard.unfreeze("backbone")


# ---- allow ------------------------------------------------------------------------------------


def test_allow_context_manager_silences_only_the_named_rule(setup):
    model, opt = setup
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.eval()
        with modeguard.allow("MG101"):
            _step(model, opt)
        assert guard.violations == []
        _step(model, opt)  # outside the block it fires
        assert [v.code for v in guard.violations] == ["MG101"]


def test_allow_covers_the_forward_not_only_the_step(setup):
    """A forward made under allow() keeps its permission until its step."""
    model, opt = setup
    with modeguard.watch(model, opt, on_violation="raise") as guard:
        model.eval()
        opt.zero_grad()
        with modeguard.allow("MG101"):
            loss = model(_x()).sum()
        loss.backward()
        opt.step()
        assert guard.violations == []


def test_allow_other_code_does_not_silence(setup):
    model, opt = setup
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.eval()
        with modeguard.allow("MG201", "eval-graph-unused"):
            _step(model, opt)
        assert [v.code for v in guard.violations] == ["MG101"]


def test_allow_as_decorator_and_nesting(setup):
    model, opt = setup

    @modeguard.allow("MG201")
    def evaluate():
        with torch.no_grad():
            return [model(_x()) for _ in range(4)]

    with modeguard.watch(model, opt, on_violation="record") as guard:
        _step(model, opt)
        evaluate()
        evaluate()  # a decorator is re-entrant
        assert guard.violations == []
        with modeguard.allow("MG101"):
            with modeguard.allow("MG201"):
                model.eval()
                _step(model, opt)
                model.train()
                with torch.no_grad():
                    for _ in range(4):
                        model(_x())
            assert guard.violations == []
        with torch.no_grad():
            for _ in range(4):
                model(_x())
        assert [v.code for v in guard.violations] == ["MG201"]


@pytest.mark.parametrize("bad", ["MG999", "step-in-training", ""])
def test_allow_bad_code_raises_value_error(bad):
    with pytest.raises(ValueError) as exc:
        modeguard.allow(bad)
    assert "MG101" in str(exc.value) and "MG602" in str(exc.value)


def test_allow_needs_a_code():
    with pytest.raises(TypeError):
        modeguard.allow()


def test_allow_accepts_names_and_repr():
    a = modeguard.allow("step-in-eval", "mg401")
    assert a.codes == {"MG101", "MG401"}
    assert repr(a) == "allow(MG101, MG401)"
