"""End to end: small real training loops, each with the exact set of rule codes it must
produce. The buggy loops are the mistakes people make; the correct ones are the
legitimate look-alikes that must stay silent."""

import contextlib
import copy
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F

import modeguard
from models import MLP, Discriminator, FineTuneNet, Generator, batch

pytestmark = pytest.mark.usefixtures("isolated")


def make_data(n=96, seed=0):
    """Inputs, and labels that depend on them (there is something to learn)."""
    x = batch(n, seed=seed)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    return x, y


def batches(x, y, size=16):
    for i in range(0, len(x), size):
        yield x[i:i + size], y[i:i + size]


def codes(guard):
    return {v.code for v in guard.violations}


@pytest.fixture(autouse=True)
def _no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # record mode: nothing may be warned
        yield


# ---- the validate-inside-the-loop bug ------------------------------------------------------------


def _classification_run(validate, fix_train_mode, epochs=3, amp=None, overflow_at=()):
    """The classifier trained for ``epochs``, with ``validate`` after each. ``amp`` runs it
    all under torch.autocast on CPU: "bf16", or "fp16" with a GradScaler; ``overflow_at``
    names steps whose gradients are made infinite, so that the scaler skips them."""
    x, y = make_data()
    xv, yv = make_data(48, seed=1)
    model = MLP(p=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if amp is None:
        autocast = contextlib.nullcontext
    else:
        autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
    scaler = torch.amp.GradScaler("cpu") if amp == "fp16" else None
    accs = []
    step = 0
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for _ in range(epochs):
            if fix_train_mode:
                model.train()
            for xb, yb in batches(x, y):
                opt.zero_grad()
                with autocast():
                    loss = F.cross_entropy(model(xb), yb)
                if scaler is None:
                    loss.backward()
                    opt.step()
                else:
                    scaler.scale(loss).backward()
                    if step in overflow_at:
                        model.fc1.weight.grad.fill_(float("inf"))
                    scaler.step(opt)  # skips opt.step() when the gradients overflowed
                    scaler.update()
                step += 1
            with autocast():
                accs.append(validate(model, xv, yv))
    return guard, accs


def _validate_no_grad(model, x, y):
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _validate_with_grad(model, x, y):
    model.eval()
    return sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in batches(x, y)) / len(x)


def _validate_forgets_eval(model, x, y):
    with torch.no_grad():
        return sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in batches(x, y)) / len(x)


def test_validate_inside_loop_without_train_is_step_in_eval():
    guard, accs = _classification_run(_validate_no_grad, fix_train_mode=False)
    assert codes(guard) == {"MG101"}
    (v,) = guard.violations
    assert v.severity is modeguard.Severity.ERROR
    assert v.location.function == "_classification_run"
    assert v.mode_set_at.how == "MLP.eval()"
    assert v.mode_set_at.location.function == "_validate_no_grad"
    assert v.first_step == 6  # the first step of the second epoch
    assert v.count == 12  # every step of epochs 2 and 3, reported once
    assert len(accs) == 3


def test_validate_inside_loop_with_grad_also_wastes_graphs():
    guard, _ = _classification_run(_validate_with_grad, fix_train_mode=False)
    assert codes(guard) == {"MG101", "MG401"}
    mg401 = next(v for v in guard.violations if v.code == "MG401")
    assert mg401.location.function == "<genexpr>"
    assert mg401.severity is modeguard.Severity.INFO


def test_correct_loop_is_silent():
    guard, _ = _classification_run(_validate_no_grad, fix_train_mode=True)
    assert codes(guard) == set()


def test_validate_that_forgets_eval_is_eval_in_train_mode():
    guard, _ = _classification_run(_validate_forgets_eval, fix_train_mode=True)
    assert codes(guard) == {"MG201"}
    (v,) = guard.violations
    assert set(v.modules) == {"bn", "drop"}
    assert v.location is not None and v.location.function == "<genexpr>"


def test_validate_bug_raises_before_the_bad_update():
    x, y = make_data()
    model = MLP(p=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = 0
    with modeguard.watch(model, opt, on_violation="raise"):
        with pytest.raises(modeguard.StepInEvalError):
            for _ in range(3):
                for xb, yb in batches(x, y):
                    opt.zero_grad()
                    F.cross_entropy(model(xb), yb).backward()
                    opt.step()
                    steps += 1
                _validate_no_grad(model, x, y)
    assert steps == 6  # stopped at the first step after validate()


# ---- frozen-backbone fine-tune --------------------------------------------------------------------


def _fine_tune(keep_backbone_in_eval, freeze_params=True, optimise_backbone=False, epochs=2, pattern="train-then-eval"):
    x, y = make_data()
    model = FineTuneNet()
    if freeze_params:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    params = model.parameters() if optimise_backbone else model.fc.parameters()
    opt = torch.optim.SGD(params, lr=0.1)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for _ in range(epochs):
            if pattern == "train-then-eval":
                model.train()
                if keep_backbone_in_eval:
                    model.backbone.eval()
            else:  # the "model.eval(); model.fc.train()" pattern
                model.eval()
                model.fc.train()
            for xb, yb in batches(x, y):
                opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                model(x)
    return guard, model


def test_frozen_backbone_fine_tune_is_silent():
    guard, model = _fine_tune(keep_backbone_in_eval=True)
    assert codes(guard) == set()
    assert model.backbone.bn.num_batches_tracked.item() == 0  # its statistics never moved


def test_frozen_backbone_eval_then_fc_train_is_silent():
    guard, _ = _fine_tune(keep_backbone_in_eval=True, pattern="eval-then-fc-train")
    assert codes(guard) == set()


def test_frozen_backbone_left_in_train_mode_drifts():
    guard, model = _fine_tune(keep_backbone_in_eval=False)
    assert codes(guard) == {"MG301"}
    (v,) = guard.violations
    assert v.modules == ["backbone.bn"]
    assert model.backbone.bn.num_batches_tracked.item() > 0  # what MG301 warns about


def test_backbone_in_eval_but_still_trained_is_step_in_eval():
    guard, _ = _fine_tune(keep_backbone_in_eval=True, freeze_params=False, optimise_backbone=True)
    assert codes(guard) == {"MG101"}
    (v,) = guard.violations
    assert set(v.modules) == {"backbone.bn", "backbone.drop"}
    assert v.severity is modeguard.Severity.ERROR  # every sensitive module was in eval
    assert v.mode_set_at.how == "Backbone.eval()"


# ---- GAN ------------------------------------------------------------------------------------------------


def _gan(one_guard, sample_every=2, steps=8):
    G, D = Generator(), Discriminator()
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3)
    real_data, _ = make_data(16 * steps)
    if one_guard:
        guard = modeguard.watch(G, opt_g, on_violation="record")
        guard.watch_model(D)
        guard.watch_optimizer(opt_d)
        guards = [guard]
    else:
        guards = [modeguard.watch(G, opt_g, on_violation="record"), modeguard.watch(D, opt_d, on_violation="record")]
    try:
        for i, (real, _) in enumerate(batches(real_data, real_data)):
            z = torch.randn(len(real), 4)
            fake = G(z)
            opt_d.zero_grad()
            d_loss = F.binary_cross_entropy_with_logits(D(real), torch.ones(len(real), 1)) + \
                F.binary_cross_entropy_with_logits(D(fake.detach()), torch.zeros(len(real), 1))
            d_loss.backward()
            opt_d.step()
            opt_g.zero_grad()
            g_loss = F.binary_cross_entropy_with_logits(D(fake), torch.ones(len(real), 1))
            g_loss.backward()
            opt_g.step()
            if i % sample_every == 0:  # look at samples the right way
                G.eval()
                with torch.no_grad():
                    G(torch.randn(8, 4))
                G.train()
        found = set()
        for g in guards:
            found |= codes(g)
        return found
    finally:
        for g in guards:
            g.unwatch()


@pytest.mark.parametrize("one_guard", [True, False], ids=["one-guard", "two-guards"])
def test_gan_is_silent(one_guard):
    assert _gan(one_guard) == set()


def test_gan_sampling_without_eval_is_reported():
    G = Generator()
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3)
    with modeguard.watch(G, opt_g, on_violation="record") as guard:
        for _ in range(3):
            opt_g.zero_grad()
            G(torch.randn(16, 4)).pow(2).mean().backward()
            opt_g.step()
        with torch.no_grad():  # sampling a grid in train mode: BatchNorm absorbs it
            samples = [G(torch.randn(8, 4)) for _ in range(4)]
        assert len(samples) == 4
        assert codes(guard) == {"MG201"}


# ---- EMA teacher --------------------------------------------------------------------------------------


def _mean_teacher(noise_wanted: bool):
    """Mean Teacher: an EMA copy of the student kept in train mode, its targets taken
    under no_grad at every step; with ``noise_wanted`` its Dropout is said to be on
    purpose, with ``allow``."""
    x, y = make_data()
    student = MLP(p=0.3)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    decay = 0.9
    allow = modeguard.allow("MG201") if noise_wanted else contextlib.nullcontext()
    with modeguard.watch(student, opt, on_violation="record") as guard:
        teacher = copy.deepcopy(student)  # made while the student is watched
        for p in teacher.parameters():
            p.requires_grad_(False)
        assert not teacher._forward_pre_hooks and not teacher._forward_hooks
        with modeguard.watch(teacher, on_violation="record") as teacher_guard:
            assert teacher_guard is not guard
            for epoch in range(2):
                student.train()
                teacher.train()
                for xb, yb in batches(x, y):
                    with torch.no_grad(), allow:
                        target = F.softmax(teacher(xb), dim=1)
                    opt.zero_grad()
                    out = student(xb)
                    loss = F.cross_entropy(out, yb) + F.kl_div(F.log_softmax(out, 1), target, reduction="batchmean")
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        for pt, ps in zip(teacher.parameters(), student.parameters()):
                            pt.mul_(decay).add_(ps, alpha=1 - decay)
                        for bt, bs in zip(teacher.buffers(), student.buffers()):
                            bt.copy_(bs)
                teacher.eval()
                student.eval()
                with torch.no_grad():
                    teacher(x), student(x)
            teacher_codes = codes(teacher_guard)
        assert codes(guard) == set()
        assert guard.models == [student]
    return teacher_codes


def test_mean_teacher_made_with_deepcopy_whose_noise_is_wanted_is_silent():
    assert _mean_teacher(noise_wanted=True) == set()


def test_teacher_made_with_deepcopy_and_left_with_dropout_active_is_reported():
    assert _mean_teacher(noise_wanted=False) == {"MG201"}


def test_ema_teacher_evaluated_in_train_mode_is_reported():
    x, _ = make_data()
    student = MLP(p=0.3)
    teacher = copy.deepcopy(student).requires_grad_(False)
    with modeguard.watch(teacher, on_violation="record") as guard:
        with torch.no_grad():
            for xb, _ in batches(x, x):  # an evaluation pass over a whole set, in train mode
                teacher(xb)
        assert codes(guard) == {"MG201"}


# ---- gradient accumulation ------------------------------------------------------------------------------


def _accumulate(accum, steps_per_update):
    x, y = make_data()
    model = MLP(p=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.train()
        opt.zero_grad()
        for i, (xb, yb) in enumerate(batches(x, y, size=8)):
            (F.cross_entropy(model(xb), yb) / accum).backward()
            if (i + 1) % accum == 0:
                for _ in range(steps_per_update):
                    opt.step()
                opt.zero_grad()
    return guard


def test_gradient_accumulation_is_silent():
    assert codes(_accumulate(accum=4, steps_per_update=1)) == set()


def test_step_twice_per_update_is_step_without_backward():
    guard = _accumulate(accum=4, steps_per_update=2)
    assert codes(guard) == {"MG602"}
    (v,) = guard.violations
    assert v.count == 3  # one extra step per update, 12 batches / 4


def test_closure_optimizer_is_silent():
    x, y = make_data()
    model = MLP(p=0.3)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for xb, yb in batches(x, y, size=48):
            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                return loss
            opt.step(closure)
        assert codes(guard) == set()


def test_swa_averaged_model_and_update_bn_are_silent():
    from torch.optim.swa_utils import AveragedModel, update_bn

    x, y = make_data()
    model = MLP(p=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        swa = AveragedModel(model)  # deep-copies the watched model
        assert all(not m._forward_pre_hooks for m in swa.modules())
        for _ in range(2):
            model.train()
            for xb, yb in batches(x, y):
                opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
            swa.update_parameters(model)
        with modeguard.watch(swa, on_violation="record") as swa_guard:
            update_bn([xb for xb, _ in batches(x, y)], swa)  # BatchNorm statistics in train mode, on purpose
            swa.eval()
            with torch.no_grad():
                swa(x)
        assert codes(swa_guard) == set()
        assert codes(guard) == set()


# ---- mixed precision: autocast and GradScaler ----------------------------------------------------


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_correct_loop_is_silent(amp):
    guard, _ = _classification_run(_validate_no_grad, fix_train_mode=True, amp=amp)
    assert codes(guard) == set()
    assert guard.steps == 18


def test_amp_steps_skipped_by_the_grad_scaler_are_silent():
    # An overflow makes GradScaler.step skip optimizer.step(): that step's backward then
    # has no step, and the next step follows a backward of its own. Nothing is wrong.
    guard, _ = _classification_run(_validate_no_grad, fix_train_mode=True, amp="fp16", overflow_at={2, 3, 9})
    assert codes(guard) == set()
    assert guard.steps == 15


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_validate_bug_is_step_in_eval(amp):
    guard, _ = _classification_run(_validate_no_grad, fix_train_mode=False, amp=amp)
    assert codes(guard) == {"MG101"}
    (v,) = guard.violations
    assert v.first_step == 6 and v.count == 12
    assert v.mode_set_at.location.function == "_validate_no_grad"


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_evaluation_with_grad_is_eval_graph_unused(amp):
    guard, _ = _classification_run(_validate_with_grad, fix_train_mode=True, amp=amp)
    assert codes(guard) == {"MG401"}
