"""modeguard.testing: the assertion helpers fire on the bugs, name the modules, stay quiet
on correct models, and leave the model as they found it."""

import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import modeguard
from modeguard.testing import assert_eval_deterministic, assert_modes, assert_modes_unchanged
from models import IN_FEATURES, MLP, DropoutHeadNet, batch

pytestmark = pytest.mark.usefixtures("isolated")


class DropoutStaysOn(MLP):
    """A train() override that keeps dropout on in eval (the MC-dropout hack, by mistake)."""

    def train(self, mode=True):
        super().train(mode)
        self.drop.train()
        return self


class BatchNormStaysInTrain(MLP):
    def train(self, mode=True):
        super().train(mode)
        self.bn.train()
        return self


class ForwardSwitchesDropoutOn(MLP):
    def forward(self, x):
        self.drop.train()
        return super().forward(x)


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(IN_FEATURES, 16)

    def forward(self, x):
        return F.dropout(self.fc(x), 0.5, training=True)


class CountsCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(IN_FEATURES, 2)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return self.fc(x)


def x(n=8):
    return batch(n, seed=3)


def validate(model, data):
    model.eval()
    with torch.no_grad():
        return model(data)


def validate_and_restore(model, data):
    was_training = model.training
    out = validate(model, data)
    model.train(was_training)
    return out


def line_of(fn, text):
    src, start = inspect.getsourcelines(fn)
    return start + next(i for i, l in enumerate(src) if text in l)


# ---- assert_eval_deterministic --------------------------------------------------------

def test_eval_deterministic_passes_a_correct_model_and_restores_its_modes():
    model = MLP().train()
    stats = model.bn.running_mean.clone()
    assert_eval_deterministic(model, x())
    assert model.training and model.drop.training and model.bn.training
    assert torch.equal(model.bn.running_mean, stats)


def test_eval_deterministic_keeps_mixed_modes_as_they_were():
    model = DropoutHeadNet().train()
    model.backbone.eval()
    assert_eval_deterministic(model, x())
    assert model.training and model.head[1].training
    assert not model.backbone.training and not model.backbone.bn.training


def test_eval_deterministic_forwards_keyword_arguments_and_compares_nested_outputs():
    class TwoHeads(MLP):
        def forward(self, x, scale=1.0):
            h = super().forward(x) * scale
            return {"logits": h, "extra": (h.argmax(1), [h.sum()])}

    assert_eval_deterministic(TwoHeads(), x(), scale=2.0)

    class NoisyHeads(TwoHeads):
        def forward(self, x, scale=1.0):
            out = super().forward(x, scale)
            out["extra"][1][0] = out["extra"][1][0] + torch.rand(())
            return out

    with pytest.raises(AssertionError, match=r"output\['extra'\]\[1\]\[0\]: max abs difference"):
        assert_eval_deterministic(NoisyHeads(), x(), scale=2.0)


def test_eval_deterministic_names_a_dropout_left_on_by_a_train_override():
    model = DropoutStaysOn().train()
    with pytest.raises(AssertionError) as info:
        assert_eval_deterministic(model, x())
    msg = str(info.value)
    assert msg.startswith("DropoutStaysOn is not deterministic in eval mode:")
    assert "1 mode-sensitive module(s) are in train mode after model.eval()" in msg
    assert "  - drop (Dropout); mode set: set to train by DropoutStaysOn.train() (an override)" in msg
    assert "two eval forwards on the same input gave different outputs" in msg
    assert "bn" not in msg.split("two eval forwards")[0].replace("DropoutStaysOn", "")
    assert model.training and model.bn.training  # restored even though it failed


def test_eval_deterministic_names_a_batchnorm_whose_running_stats_changed_and_restores_them():
    model = BatchNormStaysInTrain()
    stats = (model.bn.running_mean.clone(), model.bn.running_var.clone(), model.bn.num_batches_tracked.clone())
    with pytest.raises(AssertionError) as info:
        assert_eval_deterministic(model, x())
    msg = str(info.value)
    assert "  - bn (BatchNorm1d); mode set: set to train by BatchNormStaysInTrain.train()" in msg
    assert "buffers changed during the eval forwards:\n  - bn (BatchNorm1d), train mode: running_mean, running_var, num_batches_tracked" in msg
    # Batch statistics of the same batch are the same: the outputs agree, only the buffers tell.
    assert "different outputs" not in msg
    assert torch.equal(model.bn.running_mean, stats[0]) and torch.equal(model.bn.running_var, stats[1])
    assert torch.equal(model.bn.num_batches_tracked, stats[2])


def test_eval_deterministic_points_at_a_forward_that_switches_dropout_on():
    model = ForwardSwitchesDropoutOn()
    with pytest.raises(AssertionError) as info:
        assert_eval_deterministic(model, x())
    line = line_of(ForwardSwitchesDropoutOn.forward, "self.drop.train()")
    assert f"  - drop (Dropout); mode set: Dropout.train() at {__file__}:{line} in forward()" in str(info.value)


def test_eval_deterministic_explains_randomness_that_no_module_owns():
    with pytest.raises(AssertionError) as info:
        assert_eval_deterministic(FunctionalDropout(), x())
    msg = str(info.value)
    assert "in train mode" not in msg
    assert "every mode-sensitive module is in eval" in msg and "functional dropout with training=True" in msg


def test_eval_deterministic_names_a_custom_buffer_that_changes():
    model = CountsCalls()
    with pytest.raises(AssertionError) as info:
        assert_eval_deterministic(model, x())
    assert "buffers changed during the eval forwards:\n  - (root) (CountsCalls), eval mode: calls" in str(info.value)
    assert model.calls.item() == 0


def test_eval_deterministic_tolerance():
    class TinyNoise(MLP):
        def forward(self, x):
            return super().forward(x) + 1e-7 * torch.rand(1)

    with pytest.raises(AssertionError):
        assert_eval_deterministic(TinyNoise(), x())
    assert_eval_deterministic(TinyNoise(), x(), atol=1e-5)


def test_eval_deterministic_rejects_non_modules():
    with pytest.raises(TypeError, match="expects an nn.Module"):
        assert_eval_deterministic(lambda t: t, x())


# ---- assert_modes ---------------------------------------------------------------------

def test_assert_modes_passes_in_the_expected_mode():
    model = MLP().train()
    assert_modes(model)
    assert_modes(model.eval(), training=False)
    assert_modes(nn.Sequential(nn.Linear(2, 2), nn.ReLU()).eval())  # nothing mode-sensitive


def test_assert_modes_lists_modules_in_the_wrong_mode_with_where_it_was_set():
    model = MLP().train()
    with modeguard.watch(model, on_violation="record"):
        validate(model, x())
    with pytest.raises(AssertionError) as info:
        assert_modes(model, training=True)
    msg = str(info.value)
    line = line_of(validate, "model.eval()")
    assert msg.startswith("2 mode-sensitive module(s) of MLP are in eval mode, expected train:")
    assert f"  - bn (BatchNorm1d); mode set: MLP.eval() at {__file__}:{line} in validate()" in msg
    assert f"  - drop (Dropout); mode set: MLP.eval() at {__file__}:{line} in validate()" in msg
    assert "fix: call model.train()" in msg
    assert "fc" not in msg.replace("fix", "")  # Linear layers have no mode to get wrong


def test_assert_modes_drops_a_site_that_a_later_untraced_change_made_stale():
    model = MLP().train()
    with modeguard.watch(model, on_violation="record"):
        model.eval()
    model.train()  # not watched: no site recorded
    with pytest.raises(AssertionError) as info:
        assert_modes(model, training=False)
    assert "  - bn (BatchNorm1d)\n" in str(info.value) + "\n"
    assert "mode set" not in str(info.value)


def test_assert_modes_skips_frozen_parts_unless_asked():
    model = DropoutHeadNet().train()
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    model.backbone.eval()
    assert_modes(model, training=True)  # the frozen backbone (its Dropout included) may stay in eval
    with pytest.raises(AssertionError) as info:
        assert_modes(model, training=True, except_frozen=False)
    msg = str(info.value)
    assert "backbone.bn (BatchNorm1d)" in msg and "backbone.drop (Dropout)" in msg


def test_assert_modes_frozen_means_all_own_parameters_or_a_mark():
    model = DropoutHeadNet().train()
    model.backbone.bn.weight.requires_grad_(False)  # bias still trains: not frozen
    model.backbone.eval()
    with pytest.raises(AssertionError, match="backbone.bn"):
        assert_modes(model)
    modeguard.frozen(model.backbone)
    try:
        assert_modes(model)
    finally:
        modeguard.unfreeze(model.backbone)


def test_assert_modes_dropout_outside_the_frozen_part_still_counts():
    model = DropoutHeadNet().train()
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    model.backbone.eval()
    model.head[1].eval()
    with pytest.raises(AssertionError) as info:
        assert_modes(model)
    msg = str(info.value)
    assert "  - head.1 (Dropout)" in msg and "backbone" not in msg


# ---- assert_modes_unchanged -----------------------------------------------------------

def test_modes_unchanged_passes_a_validate_that_restores_train_mode():
    model = MLP().train()
    with assert_modes_unchanged(model):
        validate_and_restore(model, x())
    assert model.training


def test_modes_unchanged_names_the_modules_and_the_line_that_changed_them():
    model = MLP().train()
    with pytest.raises(AssertionError) as info:
        with assert_modes_unchanged(model):
            validate(model, x())
    msg = str(info.value)
    line = line_of(validate, "model.eval()")
    assert msg.startswith("the block changed the mode of 2 mode-sensitive module(s) of MLP and did not restore it:")
    assert f"  - bn (BatchNorm1d); mode set: MLP.eval() at {__file__}:{line} in validate(): train -> eval" in msg
    assert f"  - drop (Dropout); mode set: MLP.eval() at {__file__}:{line} in validate(): train -> eval" in msg


def test_modes_unchanged_reports_plain_modules_when_nothing_sensitive_changed():
    model = nn.Sequential(nn.Linear(2, 2)).train()
    with pytest.raises(AssertionError, match=r"1 module\(s\) of Sequential.*\n  - 0 \(Linear\)"):
        with assert_modes_unchanged(model):
            model[0].eval()


def test_modes_unchanged_lets_the_blocks_own_exception_through():
    model = MLP().train()
    with pytest.raises(ZeroDivisionError):
        with assert_modes_unchanged(model):
            model.eval()
            1 / 0
