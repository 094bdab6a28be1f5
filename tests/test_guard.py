"""The watch() API: arguments, bad input, watching twice, later optimizers, the context
manager, unwatch(), the MODEGUARD environment variable and the three on_violation actions."""

import inspect
import warnings

import pytest
import torch
import torch.nn as nn

import modeguard
from modeguard._guard import guard_of
from modeguard.observe import modes


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.2)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.drop(self.bn(self.fc(x))))


def _x():
    return torch.randn(6, 4, generator=torch.Generator().manual_seed(0))


def _train_step(model, opt, x):
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()


@pytest.fixture
def net_opt():
    torch.manual_seed(0)
    model = Net()
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("MODEGUARD", raising=False)
    yield
    assert not modes.is_patched(), "a test left a guard watching"


# ---- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize("thing", [object(), 3, "model", [nn.Linear(2, 2)]])
def test_watch_rejects_non_module(thing):
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        modeguard.watch(thing)
    assert not modes.is_patched()


@pytest.mark.parametrize("thing", ["sgd", object(), nn.Linear(2, 2)])
def test_watch_rejects_non_optimizer(net_opt, thing):
    model, opt = net_opt
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        modeguard.watch(model, thing)
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        modeguard.watch(model, opt, thing)
    assert guard_of(model) is None
    assert not modes.is_patched()


def test_watch_optimizer_later_rejects_non_optimizer(net_opt):
    model, _ = net_opt
    with modeguard.watch(model) as guard:
        with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer.*str"):
            guard.watch_optimizer("adam")


def test_unknown_rule_code_lists_valid_codes(net_opt):
    model, opt = net_opt
    with pytest.raises(ValueError) as exc:
        modeguard.watch(model, opt, rules={"MG999": "off"})
    for code in modeguard.RULES:
        assert code in str(exc.value)
    assert "MG999" in str(exc.value)
    assert guard_of(model) is None
    assert not modes.is_patched()


def test_unknown_severity_lists_valid_ones(net_opt):
    model, opt = net_opt
    with pytest.raises(ValueError) as exc:
        modeguard.watch(model, opt, rules={"MG401": "loud"})
    for label in ("off", "info", "warning", "error"):
        assert label in str(exc.value)
    assert not modes.is_patched()


def test_unknown_on_violation_lists_valid_ones(net_opt):
    model, _ = net_opt
    with pytest.raises(ValueError, match="warn.*raise.*record"):
        modeguard.watch(model, on_violation="shout")
    assert not modes.is_patched()


def test_rule_given_by_name_is_accepted(net_opt):
    model, opt = net_opt
    with modeguard.watch(model, opt, rules={"step-in-eval": "off"}, on_violation="record") as guard:
        model.eval()
        _train_step(model, opt, _x())
        assert guard.violations == []


def test_optimizer_without_model_params_warns_at_callers_line(net_opt):
    model, _ = net_opt
    unrelated = torch.optim.SGD(nn.Linear(3, 3).parameters(), lr=0.1)
    with pytest.warns(modeguard.ModeGuardWarning, match="holds none of the watched model's parameters") as rec:
        line = inspect.currentframe().f_lineno + 1
        guard = modeguard.watch(model, unrelated)
    try:
        (w,) = [w for w in rec if issubclass(w.category, modeguard.ModeGuardWarning)]
        assert w.filename == __file__
        assert w.lineno == line
    finally:
        guard.unwatch()


def test_optimizer_with_model_params_does_not_warn(net_opt):
    model, opt = net_opt
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        modeguard.watch(model, opt).unwatch()


# ---- watching twice, later optimizers ----------------------------------------------------


def test_watching_twice_returns_same_guard_and_hooks_once(net_opt):
    model, opt = net_opt
    guard = modeguard.watch(model, opt)
    try:
        pre, post = len(model._forward_pre_hooks), len(model._forward_hooks)
        step_pre = len(opt._optimizer_step_pre_hooks)
        assert pre == 1 and post == 1 and step_pre == 1
        again = modeguard.watch(model, opt)
        assert again is guard
        assert len(model._forward_pre_hooks) == pre
        assert len(model._forward_hooks) == post
        assert len(opt._optimizer_step_pre_hooks) == step_pre
    finally:
        guard.unwatch()


def test_watching_again_adds_new_optimizer(net_opt):
    model, opt = net_opt
    guard = modeguard.watch(model, on_violation="record")
    try:
        assert modeguard.watch(model, opt) is guard
        model.eval()
        _train_step(model, opt, _x())
        assert [v.code for v in guard.violations] == ["MG101"]
    finally:
        guard.unwatch()


def test_watch_optimizer_later(net_opt):
    model, opt = net_opt
    with modeguard.watch(model, on_violation="record") as guard:
        model.eval()
        _train_step(model, opt, _x())
        assert guard.violations == []  # the optimizer is not watched yet
        assert guard.watch_optimizer(opt) is guard
        guard.watch_optimizer(opt)  # twice: still one hook
        assert len(opt._optimizer_step_pre_hooks) == 1
        _train_step(model, opt, _x())
        assert [v.code for v in guard.violations] == ["MG101"]
    assert len(opt._optimizer_step_pre_hooks) == 0


def test_watch_optimizer_after_a_backward_does_not_blame_its_first_step(net_opt):
    model, opt = net_opt
    with modeguard.watch(model, on_violation="record") as guard:
        opt.zero_grad()
        model(_x()).sum().backward()
        guard.watch_optimizer(opt)
        opt.step()
        assert guard.violations == []
        opt.step()  # now there really was no backward since the previous step
        assert [v.code for v in guard.violations] == ["MG602"]


def test_step_without_backward_through_watch_hooks(net_opt):
    model, opt = net_opt
    with modeguard.watch(model, opt, on_violation="record") as guard:
        _train_step(model, opt, _x())
        assert guard.violations == []
        line = inspect.currentframe().f_lineno + 1
        opt.step()
        (v,) = guard.violations
        assert v.code == "MG602" and v.location.line == line
        opt.step(lambda: None)  # a closure step does its own backward: not blamed
        assert guard.violations[0].count == 1


def test_several_optimizers_positional():
    torch.manual_seed(0)
    a, b = Net(), Net()
    model = nn.ModuleDict({"a": a, "b": b})

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            return self.m["a"](x) + self.m["b"](x)

    both = Both()
    oa = torch.optim.SGD(a.parameters(), lr=0.1)
    ob = torch.optim.SGD(b.parameters(), lr=0.1)
    with modeguard.watch(both, oa, ob, on_violation="record") as guard:
        b.eval()
        oa.zero_grad(), ob.zero_grad()
        both(_x()).sum().backward()
        for o in (oa, ob):
            o.step()  # both optimizers are hooked: one report, counted twice
        (v,) = guard.violations
        assert v.code == "MG101" and v.count == 2
        assert set(v.modules) == {"m.b.bn", "m.b.drop"}


def test_second_guard_on_watched_model_is_refused(net_opt):
    model, opt = net_opt
    with modeguard.watch(model, opt) as guard:
        other = modeguard.Guard()
        try:
            with pytest.raises(ValueError, match="already watched"):
                other.watch_model(model)
        finally:
            other.unwatch()
        assert guard_of(model) is guard


# ---- context manager and unwatch ------------------------------------------------------------


def test_guard_is_context_manager(net_opt):
    model, opt = net_opt
    with modeguard.watch(model, opt, on_violation="record") as guard:
        assert isinstance(guard, modeguard.Guard)
        assert guard.active and modes.is_patched()
        assert guard_of(model) is guard
    assert not guard.active
    assert guard_of(model) is None
    assert not modes.is_patched()
    assert len(model._forward_pre_hooks) == 0 and len(model._forward_hooks) == 0
    assert len(opt._optimizer_step_pre_hooks) == 0 and len(opt._optimizer_step_post_hooks) == 0


def test_context_manager_unwatches_on_exception(net_opt):
    model, opt = net_opt
    with pytest.raises(KeyError):
        with modeguard.watch(model, opt):
            raise KeyError("boom")
    assert guard_of(model) is None
    assert not modes.is_patched()


def test_unwatch_is_idempotent(net_opt):
    model, opt = net_opt
    other = modeguard.watch(nn.Linear(2, 2))  # a second guard keeps the patches in use
    guard = modeguard.watch(model, opt)
    guard.unwatch()
    guard.unwatch()
    guard.unwatch()
    # The extra unwatch() calls must not release the other guard's share of the patches.
    assert modes.is_patched()
    other.unwatch()
    assert not modes.is_patched()


def test_unwatched_guard_sees_nothing_more(net_opt):
    model, opt = net_opt
    guard = modeguard.watch(model, opt, on_violation="record")
    guard.unwatch()
    model.eval()
    _train_step(model, opt, _x())
    assert guard.violations == []


def test_model_can_be_watched_again_after_unwatch(net_opt):
    model, opt = net_opt
    first = modeguard.watch(model, opt, on_violation="record")
    first.unwatch()
    second = modeguard.watch(model, opt, on_violation="record")
    try:
        assert second is not first
        model.eval()
        _train_step(model, opt, _x())
        assert [v.code for v in second.violations] == ["MG101"]
        assert first.violations == []
    finally:
        second.unwatch()


def test_guard_repr_and_models(net_opt):
    model, opt = net_opt
    with modeguard.watch(model, opt, on_violation="record") as guard:
        assert guard.models == [model]
        r = repr(guard)
        assert "active" in r and "Net" in r and "record" in r
    assert "inactive" in repr(guard)


# ---- on_violation and the environment variable --------------------------------------------


def test_warn_points_at_the_users_step_line(net_opt):
    model, opt = net_opt
    with modeguard.watch(model, opt) as guard:
        model.eval()
        opt.zero_grad()
        model(_x()).sum().backward()
        with pytest.warns(modeguard.StepInEvalWarning) as rec:
            line = inspect.currentframe().f_lineno + 1
            opt.step()
        (w,) = rec.list
        assert w.filename == __file__
        assert w.lineno == line
        assert w.message.violation is guard.violations[0]
        assert "model.train()" in str(w.message)


def _lines_of(rec, category):
    return [(w.filename, w.lineno) for w in rec if issubclass(w.category, category)]


def test_every_rule_warns_at_the_users_line(net_opt):
    model, opt = net_opt
    for p in model.bn.parameters():
        p.requires_grad_(False)
    here = inspect.currentframe()
    with modeguard.watch(model, opt) as guard, warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt.zero_grad()
        model(_x()).sum().backward()
        mg301 = here.f_lineno + 1
        opt.step()
        mg602 = here.f_lineno + 1
        opt.step()
        with torch.no_grad():
            mg201 = here.f_lineno + 1
            outs = [model(_x()) for _ in range(3)]
        model.eval()
        mg401 = here.f_lineno + 1
        outs = [model(_x()) for _ in range(2)]
        del outs
        opt.zero_grad()
        model(_x()).sum().backward()  # still in eval
        mg101 = here.f_lineno + 1
        opt.step()
        assert {v.code for v in guard.violations} == {"MG101", "MG201", "MG301", "MG401", "MG602"}
    # MG301 is checked at every step; its first report is at the first step.
    mg301_lines = _lines_of(rec, modeguard.FrozenBNDriftWarning)
    assert mg301_lines[0] == (__file__, mg301) and all(f == __file__ for f, _ in mg301_lines)
    assert _lines_of(rec, modeguard.StepWithoutBackwardWarning) == [(__file__, mg602)]
    assert _lines_of(rec, modeguard.EvalInTrainModeWarning) == [(__file__, mg201)]
    assert _lines_of(rec, modeguard.EvalGraphUnusedInfo) == [(__file__, mg401)]
    assert _lines_of(rec, modeguard.StepInEvalWarning) == [(__file__, mg101)]


def test_warning_category_is_filterable(net_opt):
    model, opt = net_opt
    with modeguard.watch(model, opt) as guard:
        model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warnings.filterwarnings("ignore", category=modeguard.StepInEvalWarning)
            _train_step(model, opt, _x())
        assert [v.code for v in guard.violations] == ["MG101"]


def test_raise_prevents_the_bad_update(net_opt):
    model, opt = net_opt
    with modeguard.watch(model, opt, on_violation="raise") as guard:
        model.eval()
        opt.zero_grad()
        model(_x()).sum().backward()
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(modeguard.StepInEvalError) as exc:
            opt.step()
        assert isinstance(exc.value, modeguard.ModeGuardError)
        assert exc.value.violation is guard.violations[0]
        assert exc.value.violation.code == "MG101"
        for p, b in zip(model.parameters(), before):
            assert torch.equal(p, b)


def test_raise_still_warns_info(net_opt):
    model, _ = net_opt
    with modeguard.watch(model, on_violation="raise") as guard:
        model.eval()
        with pytest.warns(modeguard.EvalGraphUnusedInfo):
            for _ in range(2):  # the second forward hands the first's freed graph to the rules
                model(_x())
        (v,) = guard.violations
        assert v.code == "MG401" and v.count == 2


def test_record_is_silent_but_collects(net_opt):
    model, opt = net_opt
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _train_step(model, opt, _x())
        assert [v.code for v in guard.violations] == ["MG101"]


def test_rule_override_error_raises_and_off_silences(net_opt):
    model, opt = net_opt
    with modeguard.watch(model, opt, on_violation="raise", rules="MG401=error,MG101=off") as guard:
        model.eval()
        _train_step(model, opt, _x())  # MG101 off: no raise
        out = model(_x())
        del out
        with pytest.raises(modeguard.EvalGraphUnusedError):
            model(_x())
        assert [(v.code, v.severity) for v in guard.violations] == [("MG401", modeguard.Severity.ERROR)]


@pytest.mark.parametrize("env, expected", [("warn", "warn"), ("raise", "raise"), ("record", "record"), (" RAISE ", "raise")])
def test_env_var_overrides_the_argument(monkeypatch, net_opt, env, expected):
    model, opt = net_opt
    monkeypatch.setenv("MODEGUARD", env)
    with modeguard.watch(model, opt, on_violation="warn" if expected != "warn" else "record") as guard:
        assert guard.config.on_violation is modeguard.OnViolation(expected)
        model.eval()
        opt.zero_grad()
        model(_x()).sum().backward()
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            if expected == "raise":
                with pytest.raises(modeguard.StepInEvalError):
                    opt.step()
            else:
                opt.step()
        mine = [w for w in rec if issubclass(w.category, modeguard.ModeGuardWarning)]
        assert len(mine) == (1 if expected == "warn" else 0)
        assert [v.code for v in guard.violations] == ["MG101"]


def test_env_var_off_installs_nothing(monkeypatch, net_opt):
    model, opt = net_opt
    monkeypatch.setenv("MODEGUARD", "off")
    guard = modeguard.watch(model, opt, on_violation="raise")
    try:
        assert not guard.active
        assert not modes.is_patched()
        assert len(model._forward_pre_hooks) == 0
        assert len(opt._optimizer_step_pre_hooks) == 0
        model.eval()
        _train_step(model, opt, _x())  # would raise if anything were installed
        assert guard.violations == []
    finally:
        guard.unwatch()


def test_bad_env_var_names_the_variable(monkeypatch, net_opt):
    model, _ = net_opt
    monkeypatch.setenv("MODEGUARD", "loud")
    with pytest.raises(ValueError, match="MODEGUARD='loud'.*warn"):
        modeguard.watch(model)
    assert not modes.is_patched()


def test_on_violation_off_argument_installs_nothing(net_opt):
    model, opt = net_opt
    guard = modeguard.watch(model, opt, on_violation="off")
    assert not guard.active and not modes.is_patched()
    assert len(model._forward_pre_hooks) == 0
    guard.unwatch()


def test_same_violation_reported_once_with_count(net_opt):
    model, opt = net_opt
    with modeguard.watch(model, opt) as guard:
        model.eval()
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            for _ in range(5):
                _train_step(model, opt, _x())
        assert len([w for w in rec if issubclass(w.category, modeguard.StepInEvalWarning)]) == 1
        (v,) = guard.violations
        assert v.count == 5
        assert v.first_step == 0


def test_a_model_in_steady_training_carries_one_hook_and_mode_changes_arm_a_one_shot_pre_hook():
    from modeguard.observe import modes

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = modeguard.watch(model, opt, on_violation="record")
    try:
        def step():
            opt.zero_grad()
            model(torch.randn(8, 4)).sum().backward()
            opt.step()

        step()
        assert len(model._forward_pre_hooks) == 0 and len(model._forward_hooks) == 1
        model.eval()  # a mode change arms the pre-hook that rebuilds the snapshot
        assert len(model._forward_pre_hooks) == 1
        with torch.no_grad():
            model(torch.randn(8, 4))
        assert len(model._forward_pre_hooks) == 0  # disarmed after one forward
        model.train()
        step()
        assert len(model._forward_pre_hooks) == 0
    finally:
        guard.unwatch()
    assert id(guard) not in modes.ON_EPOCH
    assert len(model._forward_pre_hooks) == 0 and len(model._forward_hooks) == 0


# ---- watching again, and what the guard accepts ------------------------------------------


def test_watch_again_with_other_settings_warns_and_keeps_the_first(net_opt):
    model, opt = net_opt
    with modeguard.watch(model, opt, on_violation="record", rules={"MG401": "off"}) as guard:
        with pytest.warns(modeguard.ModeGuardWarning, match=r"already watched, with other settings \(rules=, backward_sample=\)") as rec:
            again = modeguard.watch(model, opt, rules={"MG401": "error"}, backward_sample=1)
        assert rec[0].filename == __file__
        assert again is guard and guard.config.severities == {"MG401": modeguard.Severity.OFF}
        assert guard.backward_sample is None  # the first watch()'s setting, not 1


def test_watch_again_with_the_same_settings_is_silent(net_opt):
    model, opt = net_opt
    with modeguard.watch(model, opt, on_violation="record", rules={"MG401": "off"}) as guard:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert modeguard.watch(model, opt, on_violation="record", rules={"MG401": "off"}) is guard
            assert modeguard.watch(model) is guard


@pytest.mark.parametrize("bad", ["model", 3])
def test_mode_map_of_something_else_names_what_it_expects(net_opt, bad):
    model, opt = net_opt
    with modeguard.watch(model, opt, on_violation="record") as guard:
        with pytest.raises(TypeError, match=r"mode_map\(\) expects a torch.nn.Module"):
            guard.mode_map(bad)
        assert guard.mode_map().rows  # and with nothing, the watched model


# ---- optimizer wrappers, and all or nothing -----------------------------------------------


class _Wrapper:
    """An optimizer wrapper in the manner of accelerate's: it keeps the real one."""

    def __init__(self, optimizer, attr="optimizer"):
        setattr(self, attr, optimizer)

    def step(self, closure=None):
        inner = getattr(self, "optimizer", None) or getattr(self, "_optimizer")
        return inner.step(closure)


class _UninitialisedSubclass(torch.optim.Optimizer):
    """accelerate's AcceleratedOptimizer: an Optimizer subclass that never calls
    Optimizer.__init__, so it has no step hooks of its own."""

    def __init__(self, optimizer):
        self.optimizer = optimizer


@pytest.mark.parametrize("wrap", [
    lambda o: _Wrapper(o), lambda o: _Wrapper(o, "_optimizer"), lambda o: _UninitialisedSubclass(o),
    lambda o: _Wrapper(_UninitialisedSubclass(o)),
])
def test_watch_takes_optimizer_wrappers_and_watches_the_optimizer_inside(net_opt, wrap):
    model, opt = net_opt
    with modeguard.watch(model, wrap(opt), on_violation="record") as guard:
        assert guard.optimizer_state(opt) is not None and guard.has_optimizers
        _train_step(model, opt, _x())
        opt.zero_grad()
        model(_x())
        opt.step()  # no backward: seen through the wrapper's optimizer
        assert [v.code for v in guard.violations] == ["MG602"]


def test_a_wrapper_and_its_optimizer_are_one_optimizer(net_opt):
    model, opt = net_opt
    with modeguard.watch(model, opt, _Wrapper(opt), on_violation="record") as guard:
        assert len(guard._opts) == 1 and len(opt._optimizer_step_pre_hooks) == 1


def test_an_uninitialised_optimizer_subclass_with_nothing_inside_is_a_type_error(net_opt):
    model, _ = net_opt
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer objects \(or wrappers.*_UninitialisedSubclass"):
        modeguard.watch(model, _UninitialisedSubclass(None))
    assert guard_of(model) is None and not modes.is_patched()


def test_a_watch_call_that_fails_part_way_leaves_nothing_behind(net_opt):
    model, opt = net_opt
    unrelated = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the "holds none of the model's parameters" warning raises
        with pytest.raises(modeguard.ModeGuardWarning, match="holds none"):
            modeguard.watch(model, opt, unrelated, on_violation="record")
    assert guard_of(model) is None and not modes.is_patched()
    assert not opt._optimizer_step_pre_hooks and not unrelated._optimizer_step_pre_hooks
    # A second call starts afresh, with its own settings.
    with modeguard.watch(model, opt, on_violation="raise") as guard:
        assert guard.config.on_violation.value == "raise"


def test_a_failed_call_on_a_watched_model_takes_back_only_what_it_added(net_opt):
    model, opt = net_opt
    unrelated = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(modeguard.ModeGuardWarning):
                modeguard.watch(model, unrelated)
        assert guard.active and guard_of(model) is guard
        assert guard.optimizer_state(opt) is not None and guard.optimizer_state(unrelated) is None
