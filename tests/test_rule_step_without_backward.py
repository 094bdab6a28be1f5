"""MG602 step-without-backward: fires for optimizer.step() with no backward into its
parameters since its previous step; quiet for gradient accumulation, LBFGS closures
and two optimizers sharing one backward."""

import inspect
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import modeguard
from models import MLP, batch, labels, sgd, train_step

pytestmark = pytest.mark.usefixtures("isolated")


def here() -> int:
    return inspect.currentframe().f_back.f_lineno


def codes(guard, code="MG602"):
    return [v for v in guard.violations if v.code == code]


def _loss(model, seed=0):
    return F.cross_entropy(model(batch(seed=seed)), labels(seed=seed))


# ---- fires -----------------------------------------------------------------------------


def test_second_step_after_one_backward_fires_at_its_line():
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        opt.zero_grad()
        _loss(model).backward()
        opt.step()
        assert codes(guard) == []
        line = here() + 1
        opt.step()  # the same gradients applied again
        found = codes(guard)
    assert len(found) == 1
    v = found[0]
    assert v.severity is modeguard.Severity.WARNING
    assert v.location.file == __file__ and v.location.line == line
    assert v.first_step == 1
    assert "backward" in v.message


def test_a_branch_that_skips_backward_fires_once_with_a_count():
    model = MLP()
    opt = sgd(model)
    # backward_sample=1: every training forward is followed into its graph.
    with modeguard.watch(model, opt, on_violation="record", backward_sample=1) as guard:
        for step in range(12):
            opt.zero_grad()
            loss = _loss(model, seed=step)
            if step % 3 != 2:  # a skipped branch on every third step
                loss.backward()
            opt.step()
        found = codes(guard)
    assert len(found) == 1
    assert found[0].count == 4


@pytest.mark.parametrize("period", [2, 3, 8, 16])
def test_by_default_every_skipped_backward_is_caught(period):
    # Ordinary training forwards are presumed backpropagated, and the step checks the
    # presumption against the gradients themselves: every skip is caught, whatever its
    # period, with no sampling.
    model = MLP()
    opt = sgd(model)
    skips = 0
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for step in range(64 * period):
            opt.zero_grad()
            loss = _loss(model, seed=step % 5)
            if step % period == period - 1:
                skips += 1
            else:
                loss.backward()
            opt.step()
        found = codes(guard)
    assert len(found) == 1
    assert found[0].count == skips


def _skip_loop(model, opt, steps=6, skip=(1, 3, 5), zero_grad=True, set_to_none=True, clip=False):
    """Six steps, three of them with the backward skipped (a non-finite loss, say)."""
    for step in range(steps):
        if zero_grad:
            opt.zero_grad(set_to_none=set_to_none)
        loss = _loss(model, seed=step)
        if step not in skip:
            loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


@pytest.mark.parametrize("zero_grad, set_to_none", [(True, True), (True, False), (False, True)])
def test_three_skips_in_six_steps_are_three_findings(zero_grad, set_to_none):
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        _skip_loop(model, opt, zero_grad=zero_grad, set_to_none=set_to_none)
        found = codes(guard)
    assert len(found) == 1 and found[0].count == 3


def test_three_skips_are_found_in_automatic_mode_too():
    from modeguard import _auto as auto

    model = MLP()
    opt = sgd(model)
    guard = auto.start(on_violation="record")
    try:
        _skip_loop(model, opt)
    finally:
        auto.stop()
    found = codes(guard)
    assert len(found) == 1 and found[0].count == 3


def test_a_closure_that_runs_no_backward_is_caught_before_the_update():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def closure():
        opt.zero_grad()
        return _loss(model)  # the backward forgotten

    with modeguard.watch(model, opt, on_violation="raise"):
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(modeguard.StepWithoutBackwardError):
            opt.step(closure)
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_a_closure_step_is_checked_at_the_users_step_line():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def closure():
        opt.zero_grad()
        return _loss(model)

    with modeguard.watch(model, opt, on_violation="record") as guard:
        line = here() + 1
        opt.step(closure=closure)
        found = codes(guard)
    assert len(found) == 1 and found[0].location.line == line and found[0].location.file == __file__


def test_step_twice_is_caught_on_every_occurrence_whatever_the_sampling():
    # No forward at all between two steps needs no sampling to be sure of.
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for step in range(40):
            train_step(model, opt)
            if step % 4 == 3:
                opt.step()
        found = codes(guard)
    assert len(found) == 1 and found[0].count == 10


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-1, ValueError), (1.5, TypeError), ("8", TypeError), (True, TypeError)])
def test_backward_sample_must_be_a_positive_int(bad, error):
    with pytest.raises(error, match="backward_sample must be a positive int"):
        modeguard.watch(MLP(), backward_sample=bad)


def test_warns_at_the_users_step_line():
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt):
        train_step(model, opt)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            line = here() + 1
            opt.step()
    ours = [w for w in caught if issubclass(w.category, modeguard.StepWithoutBackwardWarning)]
    assert len(ours) == 1 and ours[0].filename == __file__ and ours[0].lineno == line


def test_raise_prevents_the_repeated_update():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with modeguard.watch(model, opt, on_violation="raise"):
        opt.zero_grad()
        _loss(model).backward()
        opt.step()
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(modeguard.StepWithoutBackwardError):
            opt.step()
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_a_backward_into_another_model_does_not_count():
    model, other = MLP(), MLP()
    opt = sgd(model)
    guard = modeguard.watch(model, opt, on_violation="record")
    guard.watch_model(other)
    with guard:
        train_step(model, opt)
        _loss(other).backward()
        opt.step()
        assert len(codes(guard)) == 1


# ---- stays quiet -------------------------------------------------------------------------


@pytest.mark.parametrize("set_to_none", [True, False])
def test_quiet_for_ordinary_steps_whatever_zero_grad_does(set_to_none):
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        _skip_loop(model, opt, steps=8, skip=(), set_to_none=set_to_none)
        _skip_loop(model, opt, steps=4, skip=(), zero_grad=False)  # accumulating forever
        assert guard.violations == []


def test_quiet_with_gradient_clipping_and_a_grad_scaler():
    model = MLP()
    opt = sgd(model)
    scaler = torch.amp.GradScaler("cpu")
    with modeguard.watch(model, opt, on_violation="record") as guard:
        _skip_loop(model, opt, steps=4, skip=(), clip=True)
        for step in range(4):
            opt.zero_grad()
            scaler.scale(_loss(model, seed=step)).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
        assert guard.violations == []


def test_quiet_for_a_model_whose_last_parameters_a_forward_does_not_use():
    class WithSpareHead(MLP):
        def __init__(self):
            super().__init__()
            self.spare = torch.nn.Linear(3, 3)  # registered last, used by no forward

    model = WithSpareHead()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        _skip_loop(model, opt, steps=5, skip=())
        assert guard.violations == []


def test_quiet_for_accumulation_whose_last_micro_batch_skips_its_backward():
    # A backward reached the parameters since the previous step: the step is not empty.
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for step in range(3):
            opt.zero_grad()
            _loss(model, seed=step).backward()
            _loss(model, seed=step + 10)  # skipped (non-finite, say)
            opt.step()
        assert guard.violations == []


def test_a_skipped_backward_with_no_zero_grad_either_fires():
    # The stale gradients of the previous batch are applied a second time. Found by the
    # oracle: the first parameter was untouched, the last one had no record yet.
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for step in range(3):
            opt.zero_grad()
            _loss(model, seed=step).backward()
            opt.step()
        _loss(model, seed=3)  # non-finite, say: no backward, and no zero_grad
        opt.step()
        found = codes(guard)
    assert len(found) == 1 and found[0].count == 1


def test_step_twice_after_freezing_the_first_layer_fires():
    model = nn.Sequential(nn.Linear(batch().shape[1], 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        opt.zero_grad()
        _loss(model).backward()
        opt.step()
        model[0].requires_grad_(False)  # the parameters read so far get no gradient now
        opt.zero_grad()
        _loss(model).backward()
        opt.step()
        assert codes(guard) == []
        opt.step()
        found = codes(guard)
    assert len(found) == 1 and found[0].count == 1


@pytest.mark.parametrize("set_to_none", [True, False])
def test_quiet_after_freezing_the_parameters_it_was_reading(set_to_none):
    # Fine-tuning that freezes every norm layer after a few steps: the first and last
    # small parameters the optimizer trains (BatchNorm's) stop getting gradients, the
    # Linears still do. Seen on the oracle's programs.
    model = nn.Sequential(nn.BatchNorm1d(batch().shape[1]), nn.Linear(batch().shape[1], 3), nn.BatchNorm1d(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for k in range(6):
            if k == 3:
                for m in (model[0], model[2]):
                    m.requires_grad_(False)
            opt.zero_grad(set_to_none=set_to_none)
            _loss(model).backward()
            opt.step()
        assert guard.violations == []


def test_a_skipped_backward_after_freezing_the_parameters_it_was_reading_fires():
    model = nn.Sequential(nn.BatchNorm1d(batch().shape[1]), nn.Linear(batch().shape[1], 3), nn.BatchNorm1d(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for k in range(5):
            if k == 2:
                for m in (model[0], model[2]):
                    m.requires_grad_(False)
            opt.zero_grad()
            loss = _loss(model)
            if k != 3:
                loss.backward()
            opt.step()
        found = codes(guard)
    assert len(found) == 1 and found[0].count == 1


def test_quiet_for_gradient_accumulation():
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for step in range(3):
            opt.zero_grad()
            for micro in range(4):
                (_loss(model, seed=4 * step + micro) / 4).backward()
            opt.step()
        assert guard.violations == []


def test_quiet_for_lbfgs_with_a_closure():
    model = MLP()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)

    def closure():
        opt.zero_grad()
        loss = _loss(model)
        loss.backward()
        return loss

    with modeguard.watch(model, opt, on_violation="record") as guard:
        for _ in range(3):
            opt.step(closure)
        assert guard.violations == []


def test_quiet_for_sgd_step_with_a_closure_keyword():
    model = MLP()
    opt = sgd(model)

    def closure():
        opt.zero_grad()
        loss = _loss(model)
        loss.backward()
        return loss

    with modeguard.watch(model, opt, on_violation="record") as guard:
        for _ in range(3):
            opt.step(closure=closure)
        assert guard.violations == []


def test_quiet_for_two_optimizers_after_one_backward():
    model = MLP()
    head = list(model.fc2.parameters())
    body = [p for n, p in model.named_parameters() if not n.startswith("fc2.")]
    opt_body = torch.optim.SGD(body, lr=0.1)
    opt_head = torch.optim.Adam(head, lr=0.01)
    with modeguard.watch(model, opt_body, opt_head, on_violation="record") as guard:
        for step in range(4):
            opt_body.zero_grad()
            opt_head.zero_grad()
            _loss(model, seed=step).backward()
            opt_body.step()
            opt_head.step()
        assert guard.violations == []


def test_quiet_for_an_optimizer_that_steps_less_often():
    # A slow optimizer (e.g. stepped every other batch) still saw backwards since its
    # previous step.
    model = MLP()
    opt_body = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("fc2.")], lr=0.1)
    opt_head = torch.optim.SGD(model.fc2.parameters(), lr=0.1)
    with modeguard.watch(model, opt_body, opt_head, on_violation="record") as guard:
        for step in range(6):
            _loss(model, seed=step).backward()
            opt_head.step()
            if step % 2:
                opt_body.step()
                opt_body.zero_grad()
            opt_head.zero_grad()
        assert guard.violations == []
