"""MG301 frozen-bn-drift: fires for a BatchNorm with frozen affine parameters left in
train mode while the model trains; quiet without running stats, in eval, or when the
BatchNorm's parameters are trained."""

import inspect
import warnings

import pytest
import torch
import torch.nn as nn

import modeguard
from modeguard.rules import frozen_bn_drift
from models import MLP, FineTuneNet, NormEvalNet, SmallCNN, batch, image_batch, sgd, train_step

pytestmark = pytest.mark.usefixtures("isolated")


def here() -> int:
    return inspect.currentframe().f_back.f_lineno


def codes(guard, code="MG301"):
    return [v for v in guard.violations if v.code == code]


def _step(model, opt, x):
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()


# ---- fires -----------------------------------------------------------------------------


def test_frozen_backbone_batchnorm_in_train_mode_fires():
    model = FineTuneNet().freeze_backbone()
    opt = sgd(model)  # head only
    x = batch()
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.eval()
        train_line = here() + 1
        model.train()  # the whole model, frozen backbone included
        before = model.backbone.bn.running_mean.clone()
        for _ in range(3):
            opt.zero_grad()
            model(x).sum().backward()
            step_line = here() + 1
            opt.step()
        found = codes(guard)
    # The problem is real: the "frozen" BatchNorm's statistics moved.
    assert not torch.equal(before, model.backbone.bn.running_mean)
    assert len(found) == 1
    v = found[0]
    assert v.severity is modeguard.Severity.WARNING
    assert v.modules == ["backbone.bn"]
    assert v.location.file == __file__ and v.location.line == step_line
    assert v.mode_set_at.how == "FineTuneNet.train()" and v.mode_set_at.location.line == train_line
    assert v.count == 3
    assert ".eval()" in v.message


def test_frozen_batchnorm2d_fires_and_warns_at_the_step_line():
    model = SmallCNN()
    for p in model.bn.parameters():
        p.requires_grad_(False)
    opt = sgd(model)
    with modeguard.watch(model, opt) as guard:
        opt.zero_grad()
        model(image_batch()).sum().backward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            line = here() + 1
            opt.step()
        assert [v.modules for v in codes(guard)] == [["bn"]]
    ours = [w for w in caught if issubclass(w.category, modeguard.FrozenBNDriftWarning)]
    assert len(ours) == 1 and ours[0].filename == __file__ and ours[0].lineno == line


def test_freezing_during_training_is_noticed(monkeypatch):
    # requires_grad has no hook: the flip is picked up by the periodic re-read (every
    # REFRESH_EVERY steps; shortened here to keep the test fast).
    monkeypatch.setattr(frozen_bn_drift, "REFRESH_EVERY", 8)
    model = MLP()
    opt = sgd(model)
    x = batch()
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for step in range(30):
            if step == 10:
                for p in model.bn.parameters():
                    p.requires_grad_(False)
            _step(model, opt, x)
        found = codes(guard)
    assert len(found) == 1 and found[0].modules == ["bn"]
    assert found[0].first_step >= 10


def test_a_mode_change_rereads_frozen_parameters_at_once():
    model = FineTuneNet()
    opt = sgd(model)
    x = batch()
    with modeguard.watch(model, opt, on_violation="record") as guard:
        _step(model, opt, x)
        model.freeze_backbone()
        model.eval()
        model.train()
        _step(model, opt, x)
        assert [v.modules for v in codes(guard)] == [["backbone.bn"]]


# ---- stays quiet -------------------------------------------------------------------------


def test_quiet_without_running_stats():
    model = FineTuneNet()
    model.backbone.bn = nn.BatchNorm1d(16, track_running_stats=False)
    model.freeze_backbone()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.train()
        for _ in range(3):
            train_step(model, opt)
        assert guard.violations == []


def test_quiet_when_frozen_batchnorm_is_put_in_eval():
    model = FineTuneNet().freeze_backbone()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for _ in range(3):
            model.train()
            model.backbone.eval()
            train_step(model, opt)
        assert guard.violations == []


def test_quiet_when_norm_eval_override_keeps_frozen_batchnorm_in_eval():
    model = NormEvalNet().freeze_backbone()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for _ in range(3):
            model.train()
            train_step(model, opt)
        assert [v for v in guard.violations if v.code in ("MG101", "MG301")] == []


def test_quiet_when_batchnorm_params_are_trained():
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.train()
        for _ in range(3):
            train_step(model, opt)
        assert guard.violations == []


def test_quiet_when_only_one_of_weight_and_bias_is_frozen():
    model = MLP()
    model.bn.bias.requires_grad_(False)
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for _ in range(3):
            train_step(model, opt)
        assert codes(guard) == []


def test_quiet_for_batchnorm_without_affine_parameters():
    # Nothing to freeze: an affine=False BatchNorm in train mode is ordinary training.
    model = MLP()
    model.bn = nn.BatchNorm1d(16, affine=False)
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for _ in range(3):
            train_step(model, opt)
        assert codes(guard) == []


def test_quiet_when_nothing_is_trained():
    model = FineTuneNet().freeze_backbone()
    with modeguard.watch(model, on_violation="record", rules={"MG201": "off"}) as guard:
        with torch.no_grad():
            model(batch())
        assert codes(guard) == []
