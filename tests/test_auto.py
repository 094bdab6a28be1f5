"""Automatic mode (modeguard.auto): which module calls become watched models, and that
each problem is reported once, against the model that had it.

Covers the layouts that have more than one network (teacher/student, GAN, EMA copy made
with deepcopy, target network), submodules also called on their own, models watched
explicitly inside an automatic run, and modules that are only built.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import modeguard
from modeguard import _auto as auto
from modeguard.observe import modes


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 12)
        self.bn = nn.BatchNorm1d(12)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.drop(F.relu(self.bn(self.fc(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.encoder(x))


def _x(n=8, seed=0):
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))


def _y(n=8, seed=0):
    return torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed))


def _train_step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    monkeypatch.delenv("MODEGUARD", raising=False)
    torch.manual_seed(0)
    yield
    auto.stop()
    assert not auto.active()
    assert not modes.is_patched(), "automatic mode left its patches behind"
    assert "_modeguard_original" not in vars(nn.Module.__call__)


def _run(fn, **kw):
    guard = auto.start(on_violation="record", **kw)
    try:
        fn()
        names = auto.watched_names()
    finally:
        auto.stop()
    return guard, names


def _codes(guard):
    return sorted(v.code for v in guard.violations)


# ---- what becomes a root -------------------------------------------------------------


def test_outermost_models_become_roots_and_nested_calls_do_not():
    def program():
        model = Net().eval()
        with torch.no_grad():
            model(_x())
            model(_x())

    guard, names = _run(program)
    assert names == ["Net"]
    assert guard.violations == []


def test_modules_only_built_cost_nothing():
    built = [Net() for _ in range(3)]

    def program():
        used = Net()
        used(_x())

    guard = auto.start(on_violation="record")
    try:
        program()
        session = auto._session
        assert auto.watched_names() == ["Net"]
        for m in built:
            assert id(m) not in session._known
            assert not m._forward_pre_hooks and not m._forward_hooks
    finally:
        auto.stop()


def test_parameter_free_modules_are_skipped_but_a_model_they_call_is_watched():
    class Pipeline(nn.Module):  # no parameters of its own; calls a model it was given
        def __init__(self, model):
            super().__init__()
            self.__dict__["model"] = model  # not a submodule

        def forward(self, x):
            return self.model(x)

    model = Net()

    def program():
        loss_fn = nn.CrossEntropyLoss()
        model.eval()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            loss_fn(Pipeline(model)(_x()), _y()).backward()
            opt.step()

    guard, names = _run(program)
    assert names == ["Net"]
    assert _codes(guard) == ["MG101"]


def test_roots_carry_no_hooks_so_nested_calls_stay_on_torchs_fast_path():
    model = Net()
    guard = auto.start(on_violation="record")
    try:
        model(_x())
        for m in model.modules():
            assert not m._forward_pre_hooks and not m._forward_hooks
    finally:
        auto.stop()


# ---- one report per problem ----------------------------------------------------------


def test_submodule_called_by_a_feature_monitor_adds_no_second_report():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = 4

    def program():
        model.eval()  # the bug: training in eval mode
        for i in range(steps):
            _train_step(model, opt, _x(seed=i), _y(seed=i))
            with torch.no_grad():
                model.encoder(_x(seed=100 + i)).mean()  # feature monitor

    guard, names = _run(program)
    assert names == ["Net", "Net.encoder"]
    assert _codes(guard) == ["MG101"]
    (v,) = guard.violations
    assert v.model == "Net" and v.count == steps


def test_submodule_called_first_then_the_whole_model():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def program():
        with torch.no_grad():
            model.encoder(_x())
        model.eval()
        for i in range(3):
            _train_step(model, opt, _x(seed=i), _y(seed=i))

    guard, names = _run(program)
    assert names == ["Encoder", "Net"]
    (v,) = guard.violations
    assert (v.code, v.model, v.count) == ("MG101", "Net", 3)


def test_submodule_trained_on_its_own_is_not_missed():
    model = Net()
    opt = torch.optim.SGD(model.encoder.parameters(), lr=0.1)

    def program():
        model(_x())  # the whole model is seen first
        model.eval()
        for i in range(3):  # then a pretraining stage trains the encoder alone, in eval
            opt.zero_grad()
            model.encoder(_x(seed=i)).pow(2).mean().backward()
            opt.step()

    guard, names = _run(program)
    (v,) = [v for v in guard.violations if v.code == "MG101"]
    assert v.model == "Net.encoder" and v.count == 3
    assert set(v.modules) == {"bn", "drop"}


def test_submodule_evaluated_in_train_mode_by_a_monitor_is_not_missed():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def program():
        model.train()
        _train_step(model, opt, _x(), _y())
        with torch.no_grad():  # a monitor loops over a validation set, in train mode
            for i in range(10):
                model.encoder(_x(seed=i))

    guard, _ = _run(program)
    (v,) = guard.violations
    assert v.code == "MG201" and v.model == "Net.encoder"


def test_correct_feature_monitor_is_silent():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def program():
        for i in range(4):
            model.train()
            _train_step(model, opt, _x(seed=i), _y(seed=i))
            model.encoder.eval()
            with torch.no_grad():
                model.encoder(_x(seed=50 + i))

    guard, _ = _run(program)
    assert guard.violations == []


# ---- several networks are separate roots ---------------------------------------------


def test_teacher_and_student_are_separate_roots():
    teacher, student = Net(), Net()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)

    def program():
        teacher.eval()
        student.train()
        for i in range(4):
            with torch.no_grad():
                target = teacher(_x(seed=i)).softmax(1)
            opt.zero_grad()
            F.kl_div(student(_x(seed=i)).log_softmax(1), target, reduction="batchmean").backward()
            opt.step()

    guard, names = _run(program)
    assert names == ["Net", "Net (student)"]
    assert guard.violations == []


def test_teacher_left_in_train_mode_is_reported_against_the_teacher():
    teacher, student = Net(), nn.Linear(6, 3)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)

    def program():
        teacher(_x())  # seen once in train mode...
        for i in range(12):  # ...then evaluated without eval(): a long run with no backward into it
            with torch.no_grad():
                teacher(_x(seed=i))

    guard, names = _run(program)
    (v,) = guard.violations
    assert v.code == "MG201" and v.model == "Net"


def test_gan_generator_and_discriminator_are_separate_roots():
    G = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 6))
    D = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.3), nn.LeakyReLU(0.2), nn.Linear(8, 1))
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3)

    def program(bug):
        if bug:
            D.eval()  # the bug: D trains in eval mode
        for i in range(3):
            z = torch.randn(8, 4)
            real = torch.randn(8, 6)
            opt_d.zero_grad()
            fake = G(z).detach()
            (F.softplus(-D(real)).mean() + F.softplus(D(fake)).mean()).backward()
            opt_d.step()
            opt_g.zero_grad()
            F.softplus(-D(G(z))).mean().backward()
            opt_g.step()

    guard, names = _run(lambda: program(False))
    assert names == ["Sequential", "Sequential (D)"]
    assert guard.violations == []

    guard, _ = _run(lambda: program(True))
    mg101 = [v for v in guard.violations if v.code == "MG101"]
    assert {v.model for v in mg101} == {"Sequential (D)"}  # the discriminator, not G


def test_ema_copy_made_by_deepcopy_is_a_separate_clean_root():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def program():
        model.train()
        _train_step(model, opt, _x(), _y())  # model is watched before the copy is made
        ema = copy.deepcopy(model)
        assert not ema._forward_pre_hooks and not ema._forward_hooks
        ema.eval()
        for i in range(5):
            model.train()
            _train_step(model, opt, _x(seed=i), _y(seed=i))
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.mul_(0.9).add_(pm, alpha=0.1)
                ema(_x(seed=i))

    guard, names = _run(program)
    assert names == ["Net", "Net (ema)"]
    assert guard.violations == []


def test_ema_copy_evaluated_in_train_mode_is_reported_against_the_copy():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def program():
        _train_step(model, opt, _x(), _y())
        ema = copy.deepcopy(model)  # still in train mode: the bug
        with torch.no_grad():
            for i in range(10):
                ema(_x(seed=i))

    guard, _ = _run(program)
    (v,) = guard.violations
    assert v.code == "MG201" and v.model == "Net (ema)"


def test_deepcopy_trained_in_eval_mode_is_not_missed():
    model = Net()

    def program():
        model(_x())
        clone = copy.deepcopy(model)
        clone.eval()
        opt = torch.optim.SGD(clone.parameters(), lr=0.1)
        for i in range(2):
            opt.zero_grad()
            F.cross_entropy(clone(_x(seed=i)), _y(seed=i)).backward()
            opt.step()

    guard, _ = _run(program)
    (v,) = guard.violations
    assert v.code == "MG101" and v.model == "Net (clone)" and v.count == 2


def _dqn(target_mode: str):
    online = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.1), nn.Linear(16, 2))
    target = copy.deepcopy(online)
    getattr(target, target_mode)()
    opt = torch.optim.SGD(online.parameters(), lr=0.1)

    def program():
        for i in range(6):
            with torch.no_grad():
                q_next = target(_x(seed=i)).max(1).values
            opt.zero_grad()
            F.mse_loss(online(_x(seed=i)).max(1).values, q_next).backward()
            opt.step()

    return program


def test_dqn_target_network_in_eval_once_per_step_is_silent():
    guard, names = _run(_dqn("eval"))
    assert len(names) == 2
    assert guard.violations == []


def test_dqn_target_network_left_in_train_mode_with_dropout_is_reported():
    # Its Dropout makes every Q target random: a model that is never trained, used under
    # no_grad once per step while another trains.
    guard, names = _run(_dqn("train"))
    assert len(names) == 2
    (v,) = guard.violations
    assert v.code == "MG201" and v.model == names[0] and v.modules == ["1"] and v.count == 4


# ---- living alongside explicit watch() -----------------------------------------------


def test_explicitly_watched_model_is_not_watched_twice():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    auto_guard = auto.start(on_violation="record")
    try:
        mine = modeguard.watch(model, opt, on_violation="record")
        assert mine is not auto_guard
        model.eval()
        for i in range(3):
            _train_step(model, opt, _x(seed=i), _y(seed=i))
        assert auto.watched_names() == []  # neither the model nor its encoder
        mine.unwatch()
    finally:
        auto.stop()
    assert auto_guard.violations == []
    (v,) = mine.violations
    assert v.code == "MG101" and v.count == 3


def test_optimizer_also_passed_to_watch_is_counted_once_per_step():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = auto.start(on_violation="record")
    try:
        model(_x())  # discovered by the automatic mode first
        assert modeguard.watch(model, opt) is guard
        model.eval()
        for i in range(3):
            _train_step(model, opt, _x(seed=i), _y(seed=i))
    finally:
        auto.stop()
    (v,) = guard.violations
    assert v.code == "MG101" and v.count == 3
    assert guard.steps == 3


# ---- robustness ------------------------------------------------------------------------


def test_unhashable_module_does_not_break_the_program():
    class Comparable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            return self.fc(x)

        def __eq__(self, other):  # makes instances unhashable
            return isinstance(other, Comparable)

    def program():
        m = Comparable()
        assert m.__hash__ is None
        m.eval()
        m.train()
        return m(_x())

    with pytest.warns(modeguard.ModeGuardWarning, match="cannot watch Comparable") as record:
        guard, names = _run(program)
    assert record[0].filename == __file__  # points at the user's call, not at modeguard
    # Its own submodules are still watched when it calls them (named after the module holding them).
    assert names == ["Comparable.fc"] and guard.violations == []


def test_start_returns_the_running_guard_and_stop_is_idempotent():
    g1 = auto.start(on_violation="record")
    try:
        assert auto.start() is g1 and auto.current() is g1 and auto.active()
    finally:
        assert auto.stop() is g1
    assert auto.stop() is None and auto.current() is None and not auto.active()


def test_rules_option_turns_a_rule_off():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def program():
        model.eval()
        _train_step(model, opt, _x(), _y())

    guard, _ = _run(program, rules="MG101=off")
    assert "MG101" not in _codes(guard)


def test_exception_inside_a_forward_leaves_the_depth_counter_clean():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            raise ValueError("bad input")

    ok = Net()

    def program():
        with pytest.raises(ValueError):
            Broken()(_x())
        assert auto._depth[0] == 0
        ok(_x())  # still discovered: the failed call did not leave us "inside a model"

    _, names = _run(program)
    assert names == ["Broken", "Net"]


# ---- threads, and many models ---------------------------------------------------------------


def test_mode_switches_in_one_thread_while_another_calls_new_models():
    import sys
    import threading

    errors, names = [], []
    stop = threading.Event()
    toggled = Net()

    def switcher():
        try:
            while not stop.is_set():
                toggled.train()
                toggled.eval()
        except BaseException as exc:  # what the user's own model.train() would raise
            errors.append(exc)

    def caller():
        try:
            with torch.no_grad():
                for _ in range(150):
                    Net()(_x())
            names.extend(auto.watched_names())
        except BaseException as exc:
            errors.append(exc)
        finally:
            stop.set()

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    auto.start(on_violation="record")
    try:
        threads = [threading.Thread(target=switcher), threading.Thread(target=caller)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
    finally:
        sys.setswitchinterval(old)
        auto.stop()
    assert errors == []
    assert len(names) == 150  # every new model was still watched


def test_discovering_a_model_does_not_look_at_the_models_seen_before(monkeypatch):
    walked = []
    real = nn.Module.named_modules

    def counting(self, *args, **kwargs):
        walked.append(id(self))
        return real(self, *args, **kwargs)

    def program():
        earlier = [Net() for _ in range(40)]
        for m in earlier:
            m(_x())
        monkeypatch.setattr(nn.Module, "named_modules", counting)
        newcomer = Net()
        newcomer(_x())
        monkeypatch.setattr(nn.Module, "named_modules", real)
        assert not {id(m) for m in earlier} & set(walked), "discovery walked earlier models"
        assert id(newcomer) in walked

    _, names = _run(program)
    assert len(names) == 41 and len(set(names)) == 41  # every model named, no name twice
