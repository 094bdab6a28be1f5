"""MG201 eval-in-train-mode: fires when the model is evaluated (no_grad/inference_mode,
or grad-enabled forwards nobody backpropagates) with sensitive modules in train mode;
quiet for update_bn, MC dropout, GAN and momentum-encoder forwards, allow() and
siamese/triplet steps."""

import copy
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F

import modeguard
from modeguard.rules.eval_in_train_mode import TEACHER_STEPS
from models import (
    MLP, LATENT, HFStyleModel, MCDropoutNet, PlainMLP, SiameseNet, batch, gan, labels, sgd, train_step,
)

pytestmark = pytest.mark.usefixtures("isolated")


def here() -> int:
    return inspect.currentframe().f_back.f_lineno


def codes(guard, code="MG201"):
    return [v for v in guard.violations if v.code == code]


# ---- fires -----------------------------------------------------------------------------


@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_evaluation_in_train_mode_fires_at_the_second_forward(no_grad):
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.train()
        train_step(model, opt)
        seen = []
        with no_grad():
            for seed in range(3):
                line = here() + 1
                model(batch(seed=seed))
                seen.append(len(codes(guard)))
        found = codes(guard)
    assert seen == [0, 1, 1]  # quiet after one forward, reported once from the second on
    assert len(found) == 1
    v = found[0]
    assert v.severity is modeguard.Severity.WARNING
    assert v.location.file == __file__ and v.location.line == line
    assert set(v.modules) == {"bn", "drop"}
    assert v.count == 2  # the second and third forward
    assert "model.eval()" in v.message


def test_evaluating_an_untrained_model_in_train_mode_fires():
    model = MLP()
    with modeguard.watch(model, on_violation="record") as guard:
        with torch.no_grad():
            for seed in range(3):
                model(batch(seed=seed))
        assert len(codes(guard)) == 1


def test_grad_enabled_forwards_never_backpropagated_fire():
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.train()
        train_step(model, opt)
        lines = []
        for seed in range(4):
            lines.append(here() + 1)
            score = model(batch(seed=seed)).sum().item()  # graph freed right here, unused
            assert isinstance(score, float)
        found = codes(guard)
    assert len(found) == 1
    assert found[0].location.file == __file__ and found[0].location.line == lines[0]
    assert found[0].count >= 2
    assert "no backward" in found[0].message


@pytest.mark.parametrize("batches, sample", [(3, None), (2, 1)])
def test_shortest_grad_enabled_evaluation_that_is_reported(batches, sample):
    # The first grad-enabled forward after a step looks like a training forward and is
    # presumed backpropagated; from the second on, forwards with no backward or step in
    # between are followed. So three batches are enough by default, two when every
    # forward is followed.
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record", backward_sample=sample) as guard:
        for _ in range(3):
            train_step(model, opt)
        for seed in range(batches):
            model(batch(seed=seed)).argmax(1)
        assert len(codes(guard)) == 1


def test_warn_points_at_the_evaluation_line():
    model = MLP()
    with modeguard.watch(model):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                for seed in range(3):
                    line = here() + 1
                    model(batch(seed=seed))
    ours = [w for w in caught if issubclass(w.category, modeguard.EvalInTrainModeWarning)]
    assert len(ours) == 1
    assert ours[0].filename == __file__ and ours[0].lineno == line


def test_severity_override_to_error_raises():
    model = MLP()
    with modeguard.watch(model, on_violation="raise", rules={"MG201": "error", "MG401": "off"}) as guard:
        with torch.no_grad():
            model(batch(seed=0))
            with pytest.raises(modeguard.EvalInTrainModeError):
                model(batch(seed=1))
        assert [v.severity for v in codes(guard)] == [modeguard.Severity.ERROR]


def test_rule_off_is_silent():
    model = MLP()
    with modeguard.watch(model, on_violation="record", rules={"MG201": "off"}) as guard:
        with torch.no_grad():
            for seed in range(4):
                model(batch(seed=seed))
        assert guard.violations == []


def test_fires_again_after_an_allow_block_ends():
    model = MLP()
    with modeguard.watch(model, on_violation="record") as guard:
        with modeguard.allow("MG201"), torch.no_grad():
            for seed in range(3):
                model(batch(seed=seed))
        assert codes(guard) == []
        with torch.no_grad():
            for seed in range(3):
                model(batch(seed=seed))
        assert len(codes(guard)) == 1


def test_hf_style_dropout_in_train_mode_fires():
    model = HFStyleModel(dropout=0.1)
    with modeguard.watch(model, on_violation="record") as guard:
        with torch.no_grad():
            for seed in range(3):
                model(batch(seed=seed))
        assert [v.modules for v in codes(guard)] == [["block"]]


# ---- stays quiet -------------------------------------------------------------------------


def test_quiet_when_evaluation_is_in_eval_mode():
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for _ in range(3):
            model.train()
            train_step(model, opt)
            model.eval()
            with torch.no_grad():
                for seed in range(3):
                    model(batch(seed=seed))
        assert guard.violations == []


def test_quiet_for_swa_update_bn():
    model = MLP()
    opt = sgd(model)
    loader = [batch(seed=s) for s in range(5)]
    with modeguard.watch(model, opt, on_violation="record") as guard:
        train_step(model, opt)
        swa = torch.optim.swa_utils.AveragedModel(model)
        torch.optim.swa_utils.update_bn(loader, model)
        torch.optim.swa_utils.update_bn(loader, swa)
        assert guard.violations == []


def test_quiet_for_monte_carlo_dropout():
    model = MCDropoutNet()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        train_step(model, opt)
        model.enable_mc_dropout()
        assert not model.bn.training and model.drop1.training
        with torch.no_grad():
            samples = torch.stack([model(batch(seed=9)) for _ in range(10)])
        assert samples.std(0).sum() > 0  # dropout really was random
        assert guard.violations == []


def test_quiet_for_a_gan_single_no_grad_fake_batch_between_steps():
    G, D = gan()
    opt_g, opt_d = sgd(G, 0.01), sgd(D, 0.01)
    real = batch(seed=5)
    guard = modeguard.watch(G, opt_g, on_violation="record")
    guard.watch_model(D)
    guard.watch_optimizer(opt_d)
    with guard:
        for step in range(6):
            z = torch.randn(16, LATENT)
            # Discriminator step on a fake batch made without a graph.
            with torch.no_grad():
                fake = G(z)
            opt_d.zero_grad()
            (F.softplus(-D(real)).mean() + F.softplus(D(fake)).mean()).backward()
            opt_d.step()
            # Generator step.
            opt_g.zero_grad()
            F.softplus(-D(G(z))).mean().backward()
            opt_g.step()
            # Discriminator step, the other common spelling: a graph cut by detach().
            fake = G(torch.randn(16, LATENT)).detach()
            opt_d.zero_grad()
            F.softplus(D(fake)).mean().backward()
            opt_d.step()
        assert guard.violations == []


def _distil(p: float, views: int = 1, steps: int = 10, teacher_forward=None):
    """A student and a frozen EMA copy of it kept in train mode, called under no_grad
    ``views`` times per step (MoCo's key encoder, BYOL's target, a distillation teacher)."""
    student = MLP(p=p)
    opt = sgd(student)
    teacher = copy.deepcopy(student)
    for q in teacher.parameters():
        q.requires_grad_(False)
    guard = modeguard.watch(student, opt, on_violation="record")
    guard.watch_model(teacher, name="teacher")
    call = teacher_forward or (lambda t, x: t(x))
    with guard:
        for step in range(steps):
            x = batch(seed=step)
            with torch.no_grad():
                targets = [call(teacher, x + 0.01 * v) for v in range(views)]
            opt.zero_grad()
            sum(F.mse_loss(student(x), t) for t in targets).backward()
            opt.step()
            with torch.no_grad():
                for ps, pt in zip(student.parameters(), teacher.parameters()):
                    pt.mul_(0.9).add_(ps, alpha=0.1)
        return guard.violations


@pytest.mark.parametrize("views", [1, 2])
def test_quiet_for_a_momentum_encoder_whose_train_mode_is_batchnorm_only(views):
    # MoCo, BYOL, DINO: the key encoder keeps BatchNorm's batch statistics on purpose.
    assert _distil(p=0.0, views=views) == []


@pytest.mark.parametrize("views", [1, 2])
def test_a_teacher_with_active_dropout_called_once_per_step_is_reported(views):
    found = _distil(p=0.3, views=views)
    (v,) = found
    assert v.code == "MG201" and v.model == "teacher" and v.modules == ["drop"]
    assert v.count == 10 - TEACHER_STEPS + 1 and "random" in v.headline


def test_a_teacher_is_reported_from_its_third_step():
    assert _distil(p=0.3, steps=TEACHER_STEPS - 1) == []
    assert len(_distil(p=0.3, steps=TEACHER_STEPS)) == 1


def test_quiet_for_a_mean_teacher_whose_noise_is_wanted_under_allow():
    def noisy_on_purpose(teacher, x):
        with modeguard.allow("MG201"):
            return teacher(x)

    assert _distil(p=0.3, teacher_forward=noisy_on_purpose) == []


def test_quiet_for_a_teacher_put_in_eval():
    def in_eval(teacher, x):
        teacher.eval()
        return teacher(x)

    assert _distil(p=0.3, teacher_forward=in_eval) == []


def test_quiet_under_allow_context_manager():
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        train_step(model, opt)
        with modeguard.allow("MG201"):
            with torch.no_grad():
                for seed in range(4):
                    model(batch(seed=seed))
            for seed in range(4):
                model(batch(seed=seed)).sum().item()
        assert codes(guard) == []


@modeguard.allow("MG201")
def _noisy_predictions(model, n=5):
    with torch.no_grad():
        return [model(batch(seed=s)) for s in range(n)]


def test_quiet_under_allow_decorator():
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        train_step(model, opt)
        assert len(_noisy_predictions(model)) == 5
        _noisy_predictions(model)
        assert codes(guard) == []


@pytest.mark.parametrize("arms", [2, 3], ids=["siamese", "triplet"])
def test_quiet_for_siamese_and_triplet_steps(arms):
    model = SiameseNet()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for step in range(5):
            xs = [batch(seed=10 * step + k) for k in range(arms)]
            opt.zero_grad()
            embs = [model(x) for x in xs]
            if arms == 2:
                loss = F.mse_loss(embs[0], embs[1])
            else:
                loss = F.triplet_margin_loss(*embs)
            loss.backward()
            opt.step()
        assert guard.violations == []


def test_quiet_for_a_model_without_sensitive_modules():
    model = PlainMLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        train_step(model, opt)
        with torch.no_grad():
            for seed in range(5):
                model(batch(seed=seed))
        for seed in range(5):
            model(batch(seed=seed)).sum().item()
        assert [v for v in guard.violations if v.code in ("MG101", "MG201")] == []


def test_quiet_for_one_monitoring_forward_per_step():
    # Logging a no_grad prediction once per step (train accuracy) is not an evaluation.
    model = MLP()
    opt = sgd(model)
    x, y = batch(), labels()
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for _ in range(5):
            train_step(model, opt, x, y)
            with torch.no_grad():
                model(x).argmax(1)
        assert guard.violations == []


# ---- short evaluations, and forwards that return no tensor ----------------------------------


def test_two_grad_enabled_batches_in_train_mode_after_training_are_reported():
    # The first batch looks like a training forward (it is presumed backpropagated); the
    # second is followed, found unused, and the model's gradients show that no backward
    # came after the first either.
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for _ in range(3):
            train_step(model, opt)
        scores = [model(batch(seed=seed)).argmax(1) for seed in range(2)]
        assert len(scores) == 2
        assert len(codes(guard)) == 1


def test_two_batches_in_the_middle_of_training_are_reported():
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for epoch in range(2):
            for _ in range(3):
                train_step(model, opt)
            for seed in range(2):
                model(batch(seed=seed)).argmax(1)
        assert len(codes(guard)) == 1 and codes(guard)[0].count >= 2


def test_quiet_for_two_forwards_and_one_backward_through_the_first():
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for _ in range(4):
            opt.zero_grad()
            first = F.cross_entropy(model(batch(seed=1)), labels(seed=1))
            probe = model(batch(seed=2)).argmax(1)  # a monitoring forward, unused
            first.backward()
            opt.step()
            del probe
        assert codes(guard) == []


def test_a_train_mode_forward_that_returns_a_python_number_is_evaluation():
    class Scorer(MLP):
        def forward(self, x, y=None):
            logits = super().forward(x)
            return logits if y is None else F.cross_entropy(logits, y).item()

    model = Scorer()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for _ in range(2):
            train_step(model, opt)
        for seed in range(2):
            line = here() + 1
            model(batch(seed=seed), labels(seed=seed))  # a float: the graph is gone, unused
        found = codes(guard)
    assert len(found) == 1 and found[0].location.line == line


# ---- one batch evaluated at the end, in train mode with grad enabled ------------------------


def test_one_batch_scored_after_training_is_reported_at_the_report():
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for _ in range(3):
            train_step(model, opt)
        line = here() + 1
        model(batch(seed=9)).argmax(1)  # held-out batch, still in train mode, grad enabled
        assert codes(guard) == []  # it may still be backpropagated...
        report = guard.report()  # ...until the report: then it counts
    (v,) = [v for v in report.violations if v.code == "MG201"]
    assert (v.location.file, v.location.line) == (__file__, line)
    assert v.modules == ["bn", "drop"] and "last forward" in v.headline
    assert len(guard.report().violations) == 1  # judged once


def test_one_batch_scored_after_training_is_reported_at_unwatch_in_automatic_mode():
    from modeguard import _auto as auto

    guard = auto.start(on_violation="record")
    try:
        model = MLP()
        opt = sgd(model)
        for _ in range(3):
            train_step(model, opt)
        line = here() + 1
        model(batch(seed=9)).argmax(1)
    finally:
        auto.stop()
    (v,) = guard.violations
    assert v.code == "MG201" and (v.location.file, v.location.line) == (__file__, line)


def test_quiet_for_a_batch_skipped_in_the_middle_of_training():
    # `if not torch.isfinite(loss): continue`: no backward, no step, and training goes on.
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for step in range(4):
            opt.zero_grad()
            loss = F.cross_entropy(model(batch(seed=step)), labels(seed=step))
            if step == 2:
                continue
            loss.backward()
            opt.step()
        assert guard.report().violations == []


@pytest.mark.parametrize("ending", ["step", "backward"])
def test_quiet_when_training_ends_with_its_backward_or_step(ending):
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for _ in range(2):
            train_step(model, opt)
        opt.zero_grad()
        F.cross_entropy(model(batch()), labels()).backward()
        if ending == "step":
            opt.step()
        assert guard.report().violations == []


def test_quiet_for_one_forward_of_a_model_never_trained():
    # A shape check, a dummy forward that initialises lazy modules: nothing trained yet.
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        assert model(batch()).shape == (16, 3) or True
        assert guard.report().violations == []
