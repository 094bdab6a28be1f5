"""MG101 step-in-eval: fires when optimizer.step() applies gradients from an eval-mode
forward, and stays quiet for every way of keeping modules in eval on purpose."""

import inspect
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import modeguard
from models import (
    MLP, DropoutHeadNet, FineTuneNet, HFStyleModel, NormEvalNet, SmallCNN, batch, image_batch, labels, sgd, train_step,
)

pytestmark = pytest.mark.usefixtures("isolated")


def here() -> int:
    """The caller's line number."""
    return inspect.currentframe().f_back.f_lineno


def codes(guard, code="MG101"):
    return [v for v in guard.violations if v.code == code]


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


# ---- fires -----------------------------------------------------------------------------

EVAL_LINE = None


def validate(model):
    global EVAL_LINE
    EVAL_LINE = here() + 1
    model.eval()
    with torch.no_grad():
        return model(batch(seed=1)).argmax(1)


def test_validate_inside_loop_is_an_error_at_the_step_line():
    model = MLP()
    opt = sgd(model)
    x, y = batch(), labels()
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.train()
        for _ in range(5):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            step_line = here() + 1
            opt.step()
            validate(model)  # and no model.train() before the next step
        found = codes(guard)
    assert len(found) == 1
    v = found[0]
    assert v.severity is modeguard.Severity.ERROR
    assert v.location.file == __file__ and v.location.line == step_line
    assert v.location.function == "test_validate_inside_loop_is_an_error_at_the_step_line"
    assert set(v.modules) == {"bn", "drop"}
    assert v.mode_set_at is not None and not v.mode_set_at.training
    assert v.mode_set_at.how == "MLP.eval()"
    assert v.mode_set_at.location.file == __file__
    assert v.mode_set_at.location.line == EVAL_LINE
    assert v.mode_set_at.location.function == "validate"
    assert v.count == 4  # steps 2..5 trained in eval mode
    assert v.first_step == 1
    assert "model.train()" in v.message and f"{__file__}:{step_line}" in v.message


def test_cnn_trained_after_eval_fires():
    model = SmallCNN()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.eval()
        opt.zero_grad()
        model(image_batch()).sum().backward()
        opt.step()
        assert [v.modules for v in codes(guard)] == [["bn"]]
        assert codes(guard)[0].severity is modeguard.Severity.ERROR


def test_hf_style_dropout_in_eval_fires():
    model = HFStyleModel(dropout=0.1)
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.eval()
        train_step(model, opt)
        assert [v.modules for v in codes(guard)] == [["block"]]


def test_only_some_modules_in_eval_is_a_warning():
    model = FineTuneNet()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.train()
        eval_line = here() + 1
        model.backbone.drop.eval()
        train_step(model, opt)
        found = codes(guard)
    assert len(found) == 1
    assert found[0].severity is modeguard.Severity.WARNING
    assert found[0].modules == ["backbone.drop"]
    assert found[0].mode_set_at.location.line == eval_line


def test_every_sensitive_module_in_eval_under_a_training_root_is_an_error():
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.train()
        model.bn.eval()
        model.drop.eval()
        train_step(model, opt)
        assert [v.severity for v in codes(guard)] == [modeguard.Severity.ERROR]


def test_batchnorm_in_eval_with_trainable_params_fires():
    # The contrast to the frozen case below: same layout, parameters still trained.
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.train()
        model.bn.eval()
        train_step(model, opt)
        assert [v.modules for v in codes(guard)] == [["bn"]]


def test_unfrozen_backbone_in_eval_fires():
    # The contrast to the frozen-extractor case: backbone trainable, so it is a bug.
    model = FineTuneNet()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.eval()
        model.fc.train()
        train_step(model, opt)
        found = codes(guard)
    assert len(found) == 1 and set(found[0].modules) == {"backbone.bn", "backbone.drop"}
    assert found[0].severity is modeguard.Severity.ERROR


def test_direct_training_assignment_is_reported_as_assignment():
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.train()
        assign_line = here() + 1
        model.drop.training = False
        train_step(model, opt)
        found = codes(guard)
    assert len(found) == 1 and found[0].modules == ["drop"]
    site = found[0].mode_set_at
    assert site.how == "assignment" and site.training is False
    assert site.location.file == __file__ and site.location.line == assign_line
    assert "assigned directly" in found[0].message


def test_assignment_over_all_modules_names_the_assignment():
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for m in model.modules():
            assign_line = here() + 1
            m.training = False
        train_step(model, opt)
        found = codes(guard)
    assert len(found) == 1 and found[0].severity is modeguard.Severity.ERROR
    assert found[0].mode_set_at.how == "assignment"
    assert found[0].mode_set_at.location.line == assign_line


def test_warn_points_at_the_users_step_line():
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt) as guard:
        model.eval()
        opt.zero_grad()
        model(batch()).sum().backward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step_line = here() + 1
            opt.step()
    ours = [w for w in caught if issubclass(w.category, modeguard.ModeGuardWarning)]
    assert len(ours) == 1
    w = ours[0]
    assert issubclass(w.category, modeguard.StepInEvalWarning)
    assert w.filename == __file__ and w.lineno == step_line
    assert w.message.violation is guard.violations[0]


def test_raise_prevents_the_bad_update():
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="raise"):
        train_step(model, opt)  # a good step first: no error
        model.eval()
        opt.zero_grad()
        model(batch()).sum().backward()
        before = params_of(model)
        with pytest.raises(modeguard.StepInEvalError) as info:
            opt.step()
        after = params_of(model)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert isinstance(info.value, modeguard.ModeGuardError)
    assert "MG101" in str(info.value)


def test_twenty_step_loop_reports_once_with_a_running_count():
    model = MLP()
    opt = sgd(model)
    x, y = batch(), labels()
    with modeguard.watch(model, opt) as guard:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(20):
                model.train()
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
                if step % 5 == 4:
                    validate(model)  # the next step (and only it) trains in eval
                    model.eval()
                    opt.zero_grad()
                    F.cross_entropy(model(x), y).backward()
                    opt.step()
        found = codes(guard)
    assert len(found) == 1
    assert found[0].count == 4
    assert len([w for w in caught if issubclass(w.category, modeguard.StepInEvalWarning)]) == 1


# ---- stays quiet -------------------------------------------------------------------------


def test_quiet_in_an_ordinary_training_loop():
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for _ in range(3):
            model.train()
            train_step(model, opt)
            validate(model)
        assert guard.violations == []


def test_quiet_for_batchnorm_whose_own_params_are_frozen():
    model = MLP()
    for p in model.bn.parameters():
        p.requires_grad_(False)
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for _ in range(3):
            model.train()
            model.bn.eval()
            train_step(model, opt)
        assert guard.violations == []


def test_quiet_for_frozen_feature_extractor_with_fc_in_train():
    model = FineTuneNet().freeze_backbone()
    opt = sgd(model)  # fc only
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for _ in range(3):
            model.eval()
            model.fc.train()
            train_step(model, opt)
        assert guard.violations == []


def test_dropout_after_a_frozen_extractor_still_fires():
    # A Dropout whose input does require grad (it sits in the trained head) is not
    # frozen, even though it has no parameters of its own.
    model = DropoutHeadNet().freeze_backbone()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.eval()
        for _ in range(2):
            train_step(model, opt)
        found = codes(guard)
    assert len(found) == 1 and found[0].modules == ["head.1"]


# ---- parameter-free modules in eval: fed the model's inputs, or behind frozen layers ----


def input_dropout_net(p=0.5):
    """The input-layer Dropout of an MLP on images: its input never requires grad."""
    return nn.Sequential(nn.Flatten(), nn.Dropout(p), nn.Linear(2 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_input_layer_dropout_put_in_eval_then_trained_fires():
    model = input_dropout_net()
    opt = sgd(model)
    x, y = torch.randn(8, 2, 4, 4), torch.randint(0, 3, (8,))
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model[1].eval()
        for _ in range(2):
            train_step(model, opt, x, y)
        found = codes(guard)
    assert len(found) == 1 and found[0].modules == ["1"]


class KeywordDropout(nn.Module):
    """A custom parameter-free module reading ``self.training``, fed by keyword."""

    def forward(self, *, hidden):
        return F.dropout(hidden, 0.3, self.training)


class KeywordNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.noise = KeywordDropout()
        self.fc = nn.Linear(IN, 3)

    def forward(self, x):
        return self.fc(self.noise(hidden=x))


IN = batch().shape[1]


def test_input_reaching_a_custom_module_by_keyword_fires():
    model = KeywordNet()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.noise.eval()
        train_step(model, opt)
        found = codes(guard)
    assert len(found) == 1 and found[0].modules == ["noise"]


def test_model_called_with_keyword_inputs_fires():
    # The model's own input handed over by keyword (Hugging Face style: model(input_ids=...)).
    class ByKeyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop, self.fc = nn.Dropout(0.5), nn.Linear(IN, 3)

        def forward(self, *, features):
            return self.fc(self.drop(features))

    model = ByKeyword()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.eval()
        opt.zero_grad()
        F.cross_entropy(model(features=batch()), labels()).backward()
        opt.step()
        found = codes(guard)
    assert len(found) == 1 and found[0].modules == ["drop"]


def test_quiet_for_an_input_layer_dropout_of_a_frozen_backbone():
    # The Dropout is the backbone's first layer; the backbone is frozen and in eval.
    backbone = nn.Sequential(nn.Dropout(0.2), nn.Linear(IN, 16), nn.ReLU())
    model = nn.Sequential(backbone, nn.Linear(16, 3))
    backbone.requires_grad_(False)
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        backbone.eval()
        for _ in range(2):
            train_step(model, opt)
        assert guard.violations == []


def test_quiet_for_the_input_dropout_of_a_model_trained_in_train_mode():
    model = input_dropout_net()
    opt = sgd(model)
    x, y = torch.randn(8, 2, 4, 4), torch.randint(0, 3, (8,))
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for _ in range(2):
            train_step(model, opt, x, y)
        model.eval()
        with torch.no_grad():
            model(x)
        model.train()
        train_step(model, opt, x, y)
        assert guard.violations == []


def test_a_layer_unfrozen_with_no_mode_change_is_seen_at_the_next_step():
    # Gradual unfreezing: the Linear before the Dropout starts training; nothing calls
    # train() or eval(), and the next step trains through the Dropout in eval.
    model = nn.Sequential(nn.Linear(IN, 16), nn.Dropout(0.5), nn.Linear(16, 3))
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.eval()
        train_step(model, opt)
        assert codes(guard) == []  # a frozen extractor so far
        model[0].requires_grad_(True)
        train_step(model, opt)
        found = codes(guard)
    assert len(found) == 1 and found[0].modules == ["1"]


def test_a_layer_frozen_with_no_mode_change_silences_the_next_step():
    model = nn.Sequential(nn.Linear(IN, 16), nn.Dropout(0.5), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.eval()
        train_step(model, opt)
        assert len(codes(guard)) == 1
        guard.clear()
        model[0].requires_grad_(False)  # now a frozen extractor in front of the head
        train_step(model, opt)
        assert codes(guard) == []


def test_a_shared_dropout_is_judged_in_every_call():
    # One Dropout used twice: behind a frozen Linear, then behind a trained one.
    drop = nn.Dropout(0.5)
    model = nn.Sequential(nn.Linear(IN, IN), drop, nn.Linear(IN, IN), drop, nn.Linear(IN, 3))
    model[0].requires_grad_(False)
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.eval()
        train_step(model, opt)
        found = codes(guard)
    assert len(found) == 1 and found[0].modules == ["1"]


def test_probes_leave_no_hook_behind_even_when_a_forward_raises():
    registry = nn.modules.module
    model = input_dropout_net()
    opt = sgd(model)
    guard = modeguard.watch(model, opt, on_violation="record")
    model.eval()
    with pytest.raises(RuntimeError):
        model(torch.randn(8, 3, 3))  # wrong shape: the first Linear raises
    model(torch.randn(8, 2, 4, 4))
    assert not registry._global_forward_pre_hooks
    with pytest.raises(RuntimeError):
        model(torch.randn(8, 3, 3))
    guard.unwatch()
    assert not registry._global_forward_pre_hooks
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


class Holder(nn.Module):
    """A model that is never called itself: its submodules are (a LightningModule whose
    training_step calls ``self.net(x)``)."""

    def __init__(self):
        super().__init__()
        self.net = MLP()


def test_submodules_called_outside_the_models_forward_are_checked_at_the_step():
    holder = Holder()
    opt = sgd(holder)
    with modeguard.watch(holder, opt, on_violation="record") as guard:
        holder.net.train()
        train_step(holder.net, opt)
        assert codes(guard) == []
        holder.net.eval()  # validate(), and nothing puts it back
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(holder.net(batch()), labels()).backward()
            opt.step()
        found = codes(guard)
    assert len(found) == 1 and found[0].modules == ["net.bn", "net.drop"] and found[0].count == 3


def test_quiet_for_submodules_called_outside_the_models_forward_in_train_mode():
    holder = Holder()
    opt = sgd(holder)
    with modeguard.watch(holder, opt, on_violation="record") as guard:
        for _ in range(3):
            train_step(holder.net, opt)
        holder.eval()
        with torch.no_grad():
            holder.net(batch())
        holder.train()
        train_step(holder.net, opt)
        assert guard.violations == []


def test_quiet_for_a_frozen_part_called_outside_the_models_forward():
    holder = Holder()
    holder.net.fc1.requires_grad_(False)
    holder.net.bn.requires_grad_(False)
    opt = sgd(holder)
    with modeguard.watch(holder, opt, on_violation="record") as guard:
        holder.net.bn.eval()  # a frozen BatchNorm kept in eval on purpose
        for _ in range(3):
            train_step(holder.net, opt)
        assert guard.violations == []


def test_quiet_for_modules_marked_frozen():
    model = FineTuneNet()
    opt = sgd(model)
    modeguard.frozen(model.backbone)
    try:
        with modeguard.watch(model, opt, on_violation="record") as guard:
            for _ in range(3):
                model.train()
                model.backbone.eval()
                train_step(model, opt)
            assert guard.violations == []
    finally:
        modeguard.unfreeze(model.backbone)


def test_quiet_for_watch_frozen_patterns():
    model = FineTuneNet()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record", frozen=["backbone.*"]) as guard:
        for _ in range(3):
            model.train()
            model.backbone.eval()
            train_step(model, opt)
        assert guard.violations == []


def test_quiet_for_watch_frozen_modules():
    model = FineTuneNet()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record", frozen=[model.backbone]) as guard:
        model.train()
        model.backbone.eval()
        train_step(model, opt)
        assert guard.violations == []


def test_quiet_for_norm_eval_train_override():
    model = NormEvalNet()  # BN parameters trainable, kept in eval by the model's train()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for _ in range(3):
            model.train()
            assert not model.backbone.bn.training and model.backbone.drop.training
            train_step(model, opt)
            validate(model)
        assert guard.violations == []


def test_norm_eval_override_does_not_hide_the_validate_bug():
    model = NormEvalNet()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.train()
        train_step(model, opt)
        validate(model)
        train_step(model, opt)  # no model.train(): dropout is in eval too
        found = codes(guard)
    assert len(found) == 1
    assert "backbone.drop" in found[0].modules


def test_quiet_when_a_framework_saves_and_restores_modes():
    def evaluate(model):
        # What trainer frameworks do: remember each module's mode and put it back.
        saved = {m: m.training for m in model.modules()}
        model.eval()
        try:
            with torch.no_grad():
                return model(batch(seed=2)).mean().item()
        finally:
            for m, mode in saved.items():
                m.training = mode  # per module, as Lightning restores them

    def evaluate_simple(model):
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(batch(seed=3))
        model.train(was_training)

    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.train()
        for _ in range(4):
            train_step(model, opt)
            evaluate(model)
            train_step(model, opt)
            evaluate_simple(model)
        assert guard.violations == []


def test_quiet_after_an_eval_input_gradient_then_model_train():
    # A saliency map in eval mode backpropagates an eval forward; the training step
    # that follows model.train() uses its own, train-mode forward.
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.train()
        train_step(model, opt)
        model.eval()
        x = batch(seed=4).requires_grad_(True)
        (g,) = torch.autograd.grad(model(x).sum(), x)
        assert g.shape == x.shape
        model.train()
        train_step(model, opt)
        assert guard.violations == []


@pytest.mark.parametrize("sample", [1, 1000])
def test_quiet_after_an_eval_backward_into_the_parameters_then_a_train_step(sample):
    # An attack or a probe that calls loss.backward() in eval mode fills .grad; the user
    # zeroes it and trains in train mode. The step applies the train forward's gradients,
    # whether that forward was followed into its graph (sample=1) or presumed (1000).
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record", backward_sample=sample) as guard:
        for step in range(3):
            model.eval()
            model(batch(seed=step)).sum().backward()
            model.train()
            train_step(model, opt)
        assert guard.violations == []


@pytest.mark.parametrize("sample", [1, 1000])
@pytest.mark.parametrize("eval_backward, expected", [(True, 1), (False, 0)])
def test_the_step_applies_the_latest_backpropagated_forward(sample, eval_backward, expected):
    # Order matters, not which forwards ran since the last step. After a train-mode
    # forward and its backward, an eval-mode forward that is backpropagated too is what
    # step() applies (MG101); one that is only logged is not (MG401 may note its graph).
    # Same whether the train forward was followed (sample=1) or presumed (1000).
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record", backward_sample=sample) as guard:
        train_step(model, opt)
        opt.zero_grad()
        model(batch(seed=1)).sum().backward()
        model.eval()
        out = model(batch(seed=2))
        if eval_backward:
            out.sum().backward()
        model.train()
        opt.step()
        assert len(codes(guard)) == expected


def test_quiet_under_allow_around_the_forward_or_the_step():
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.eval()
        opt.zero_grad()
        with modeguard.allow("MG101"):
            model(batch()).sum().backward()
        opt.step()
        opt.zero_grad()
        model(batch()).sum().backward()
        with modeguard.allow("MG101"):
            opt.step()
        assert codes(guard) == []
        train_step(model, opt)  # outside allow() the same mistake is reported
        assert len(codes(guard)) == 1


def test_unfreeze_takes_the_mark_back():
    model = FineTuneNet()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        modeguard.frozen(model.backbone)
        model.train()
        model.backbone.eval()
        train_step(model, opt)
        assert codes(guard) == []
        modeguard.unfreeze(model.backbone)
        train_step(model, opt)
        assert [set(v.modules) for v in codes(guard)] == [{"backbone.bn", "backbone.drop"}]


# ---- the why speaks of the modules present ----------------------------------------------------


@pytest.mark.parametrize("model, says, never", [
    (lambda: torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3)),
     "Dropout was switched off while", "BatchNorm"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3)),
     "BatchNorm normalised with its frozen running statistics while", "Dropout"),
    (lambda: MLP(), "Dropout was switched off and BatchNorm normalised", None),
    (lambda: HFStyleModel(dropout=0.1), "modules that read self.training ran their eval-mode code", "BatchNorm"),
])
def test_the_why_is_about_the_kinds_of_modules_in_eval(model, says, never):
    net = model()
    opt = sgd(net)
    with modeguard.watch(net, opt, on_violation="record") as guard:
        net.eval()
        train_step(net, opt, batch(), labels())
        (v,) = codes(guard)
    assert says in v.why and (never is None or never not in v.why), v.why
    assert v.why in v.message.replace("\n            ", " ")
