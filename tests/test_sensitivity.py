"""Which modules count as mode-sensitive: Dropout and BatchNorm families by type (with
the cases where train and eval compute the same thing), attention and RNN dropout,
custom forwards that read self.training, and register_sensitive. Which are frozen:
params_frozen, frozen marks, frozen= patterns. A model without any sensitive module
never gets MG101/MG201 above info."""

import functools
import gc
import warnings
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import modeguard
from modeguard.observe import modes, sensitivity
from modeguard.observe.sensitivity import classify
from modeguard.observe.snapshot import ModeSnapshot
from models import (
    MLP, FineTuneNet, HFStyleBlock, HFStyleModel, MCDropoutNet, PlainMLP, batch, sgd, train_step,
)

pytestmark = pytest.mark.usefixtures("isolated")


@pytest.fixture
def clean_registry(monkeypatch):
    """register_sensitive has no inverse: give each test its own registry."""
    monkeypatch.setattr(sensitivity, "_registered", dict(sensitivity._registered))
    monkeypatch.setattr(sensitivity, "_predicates", list(sensitivity._predicates))


# ---- classification ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "module, kind",
    [
        (nn.Dropout(0.5), "dropout"),
        (nn.Dropout(0.0), None),
        (nn.Dropout1d(0.2), "dropout"),
        (nn.Dropout2d(0.2), "dropout"),
        (nn.Dropout3d(0.0), None),
        (nn.AlphaDropout(0.1), "dropout"),
        (nn.FeatureAlphaDropout(0.1), "dropout"),
        (nn.BatchNorm1d(4), "batchnorm"),
        (nn.BatchNorm2d(4), "batchnorm"),
        (nn.BatchNorm3d(4), "batchnorm"),
        (nn.SyncBatchNorm(4), "batchnorm"),
        (nn.BatchNorm1d(4, track_running_stats=False), None),
        (nn.BatchNorm2d(4, affine=False), "batchnorm"),
        (nn.InstanceNorm2d(4), None),
        (nn.InstanceNorm1d(4, track_running_stats=True), "instancenorm"),
        (nn.InstanceNorm2d(4, affine=True, track_running_stats=True), "instancenorm"),
        (nn.MultiheadAttention(8, 2, dropout=0.1), "dropout"),
        (nn.MultiheadAttention(8, 2), None),
        (nn.LSTM(4, 4, num_layers=2, dropout=0.2), "dropout"),
        (nn.GRU(4, 4, num_layers=2), None),
        (nn.RReLU(), "custom"),
        (nn.Linear(4, 4), None),
        (nn.LayerNorm(4), None),
        (nn.GroupNorm(2, 4), None),
        (nn.ReLU(), None),
        (nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)), None),  # its child is, not it
        (nn.TransformerEncoderLayer(8, 2, dim_feedforward=16), None),  # fast-path flag only
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v),
)
def test_classify_by_type(module, kind):
    assert classify(module) == kind


def test_single_layer_rnn_dropout_does_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns about this very thing
        rnn = nn.LSTM(4, 4, num_layers=1, dropout=0.3)
    assert classify(rnn) is None


def test_transformer_layer_dropouts_are_sensitive_children():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.1)
    kinds = {name: classify(m) for name, m in layer.named_modules() if classify(m)}
    assert kinds and set(kinds.values()) == {"dropout"}
    assert "dropout1" in kinds and "self_attn" in kinds
    no_drop = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0)
    assert [n for n, m in no_drop.named_modules() if classify(m)] == []


def test_hf_style_forward_reading_self_training_is_custom():
    assert classify(HFStyleBlock(dropout=0.1)) == "custom"
    assert classify(HFStyleModel(dropout=0.1)) is None  # the block is; the wrapper is not
    assert classify(HFStyleBlock(dropout=0.0)) is None  # config with dropout 0.0


class _CheckpointedStack(nn.Module):
    """A Hugging Face encoder: self.training read only to choose gradient checkpointing."""

    def __init__(self):
        super().__init__()
        self.gradient_checkpointing = False
        self.layer = nn.Linear(4, 4)

    def forward(self, x):
        if self.gradient_checkpointing and self.training:
            return torch.utils.checkpoint.checkpoint(self.layer, x, use_reentrant=False)
        return self.layer(x)


def _checkpointing_wrapper(forward):
    @functools.wraps(forward)
    def forward_with_checkpointing(self, *args, **kwargs):
        if getattr(self, "gradient_checkpointing", False) and self.training:
            pass  # would checkpoint here
        return forward(self, *args, **kwargs)

    return forward_with_checkpointing


def test_reading_training_only_for_gradient_checkpointing_is_not_sensitive():
    assert classify(_CheckpointedStack()) is None

    class WrappedLayer(nn.Module):  # transformers' GradientCheckpointingLayer wraps forward
        def __init__(self):
            super().__init__()
            self.drop_p = 0.1

        @_checkpointing_wrapper
        def forward(self, x):
            return x

    assert classify(WrappedLayer()) is None

    class WrappedDropping(WrappedLayer):  # ... but the wrapped forward itself may read it
        @_checkpointing_wrapper
        def forward(self, x):
            return F.dropout(x, self.drop_p, training=self.training)

    assert classify(WrappedDropping()) == "custom"

    class Both(_CheckpointedStack):  # checkpointing, and dropout of its own
        def forward(self, x):
            if self.gradient_checkpointing and self.training:
                x = x * 1
            return F.dropout(self.layer(x), 0.1, training=self.training)

    assert classify(Both()) == "custom"


def test_forward_reading_training_in_a_nested_function_is_custom():
    class Noisy(nn.Module):
        def forward(self, x):
            def noise(t):
                return t + torch.randn_like(t) if self.training else t

            return noise(x)

    assert classify(Noisy()) == "custom"


def test_hf_style_attributes_all_zero_is_not_sensitive():
    class Attn(nn.Module):
        def __init__(self, attention_dropout, hidden_dropout_prob):
            super().__init__()
            self.attention_dropout = attention_dropout
            self.hidden_dropout_prob = hidden_dropout_prob

        def forward(self, x):
            x = F.dropout(x, p=self.attention_dropout, training=self.training)
            return F.dropout(x, p=self.hidden_dropout_prob, training=self.training)

    assert classify(Attn(0.0, 0.0)) is None
    assert classify(Attn(0.0, 0.1)) == "custom"


def test_register_sensitive_class_and_predicate(clean_registry):
    class Stochastic(nn.Module):
        def forward(self, x):
            return x

    class Tagged(nn.Module):
        noisy = False

        def forward(self, x):
            return x

    class SubStochastic(Stochastic):
        pass

    assert classify(Stochastic()) is None
    modeguard.register_sensitive(Stochastic)
    assert classify(Stochastic()) == "registered"
    assert classify(SubStochastic()) == "registered"  # subclasses too

    modeguard.register_sensitive(lambda m: getattr(m, "noisy", False), kind="noise")
    t = Tagged()
    assert classify(t) is None
    t.noisy = True
    assert classify(t) == "noise"
    # Explicit registration wins over the built-in rules.
    modeguard.register_sensitive(nn.LayerNorm, kind="layernorm")
    assert classify(nn.LayerNorm(4)) == "layernorm"


@pytest.mark.parametrize("bad", [int, "Dropout", 3])
def test_register_sensitive_rejects_non_modules(clean_registry, bad):
    with pytest.raises(TypeError, match="nn.Module"):
        modeguard.register_sensitive(bad)


def test_registered_module_in_eval_during_training_fires_mg101(clean_registry):
    class Jitter(nn.Module):
        def forward(self, x):  # reads no flag itself: only registration makes it count
            return x

    model = nn.Sequential(nn.Linear(8, 8), Jitter(), nn.Linear(8, 3))
    opt = sgd(model)
    modeguard.register_sensitive(Jitter, kind="jitter")
    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.eval()
        train_step(model, opt)
        found = [v for v in guard.violations if v.code == "MG101"]
    assert len(found) == 1 and found[0].modules == ["1"]


def test_explicit_registration_beats_a_predicate_and_a_predicate_beats_the_built_in_rules(clean_registry):
    modeguard.register_sensitive(lambda m: isinstance(m, nn.Dropout), kind="predicate")
    assert classify(nn.Dropout(0.5)) == "predicate"
    assert classify(nn.Dropout(0.0)) == "predicate"  # even where the built-in rule says None
    modeguard.register_sensitive(nn.Dropout, kind="class")
    assert classify(nn.Dropout(0.5)) == "class"


def test_registering_moves_the_mode_epoch(clean_registry, epochs):
    before = modes.MODE_EPOCH[0]
    modeguard.register_sensitive(nn.Identity)
    modeguard.register_sensitive(lambda m: False)
    assert modes.MODE_EPOCH[0] == before + 2  # watched models look at their modules again


@pytest.mark.parametrize("attr", ["p", "drop_prob", "drop_rate", "hidden_dropout"])
def test_dropout_like_float_attributes_at_zero_switch_a_custom_module_off(attr):
    class Drop(nn.Module):
        def __init__(self, value):
            super().__init__()
            setattr(self, attr, value)

        def forward(self, x):
            return F.dropout(x, getattr(self, attr), self.training)

    assert classify(Drop(0.0)) is None
    assert classify(Drop(0.1)) == "custom"


def test_other_float_attributes_at_zero_do_not_count():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = 0.0

        def forward(self, x):
            return x * self.scale if self.training else x

    assert classify(Scaled()) == "custom"


def test_whether_a_forward_reads_training_is_worked_out_once_per_class(monkeypatch):
    monkeypatch.setattr(sensitivity, "_reads_training_cache", {})

    class Plain(nn.Module):
        def forward(self, x):
            return x

    assert classify(Plain()) is None
    assert sensitivity._reads_training_cache == {Plain: False}
    sensitivity._reads_training_cache[Plain] = True  # the cache, not the code, answers now
    assert classify(Plain()) == "custom"


# ---- BatchNorm, parameters, frozen marks and patterns -------------------------------------------


@pytest.mark.parametrize("module, expected", [
    (nn.BatchNorm1d(4), True),
    (nn.BatchNorm2d(4, track_running_stats=False), True),
    (nn.SyncBatchNorm(4), True),
    (nn.InstanceNorm2d(4), True),
    (nn.GroupNorm(2, 4), False),
    (nn.LayerNorm(4), False),
    (nn.Dropout(0.5), False),
], ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v))
def test_is_batchnorm(module, expected):
    assert sensitivity.is_batchnorm(module) is expected


def test_params_frozen_true_false_or_none():
    model = FineTuneNet()
    params_frozen = sensitivity.params_frozen
    assert params_frozen(model.backbone.drop, recurse=True) is None  # no parameters at all
    assert params_frozen(model.backbone, recurse=False) is None  # none of its own
    assert params_frozen(model.backbone, recurse=True) is False
    model.backbone.bn.weight.requires_grad_(False)
    assert params_frozen(model.backbone.bn, recurse=False) is False  # its bias still trains
    model.freeze_backbone()
    assert params_frozen(model.backbone, recurse=True) is True
    assert params_frozen(model, recurse=True) is False  # fc trains
    no_bias = nn.Linear(2, 2, bias=False).requires_grad_(False)
    assert no_bias._parameters["bias"] is None
    assert params_frozen(no_bias, recurse=False) is True


def test_frozen_marks_are_set_taken_back_and_move_the_mode_epoch(epochs):
    model = FineTuneNet()
    before = modes.MODE_EPOCH[0]
    sensitivity.mark_frozen([model.backbone])
    try:
        assert sensitivity.is_marked_frozen(model.backbone)
        assert not sensitivity.is_marked_frozen(model.backbone.bn)  # the mark is on the module; walks pass it down
        assert modes.MODE_EPOCH[0] == before + 1
    finally:
        sensitivity.unmark_frozen([model.backbone])
    assert not sensitivity.is_marked_frozen(model.backbone)
    assert modes.MODE_EPOCH[0] == before + 2
    sensitivity.unmark_frozen([model.fc])  # never marked: no error


def test_frozen_marks_reject_non_modules_and_hold_modules_weakly(epochs):
    with pytest.raises(TypeError, match=r"expects nn.Module objects.*got torch.nn.parameter.Parameter"):
        sensitivity.mark_frozen([nn.Linear(2, 2).weight])
    module = nn.Dropout(0.5)
    sensitivity.mark_frozen([module])
    ref = weakref.ref(module)
    del module
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("name, patterns, expected", [
    ("backbone", ["backbone.*"], True),  # the module itself
    ("backbone.layer1.bn", ["backbone.*"], True),
    ("backbone2.bn", ["backbone.*"], False),
    ("head.drop", ["*.drop"], True),
    ("head.Drop", ["*.drop"], False),  # case matters
    ("fc", ["backbone.*", "fc"], True),
    ("fc", [], False),
])
def test_matches_any(name, patterns, expected):
    assert sensitivity.matches_any(name, patterns) is expected


# ---- snapshots and the mode map ---------------------------------------------------------


def test_snapshot_states():
    model = MCDropoutNet()
    assert ModeSnapshot(model).state == "train"
    model.eval()
    assert ModeSnapshot(model).state == "eval"
    model.enable_mc_dropout()
    snap = ModeSnapshot(model)
    assert snap.state == "mixed" and not snap.root_training
    assert {e.name for e in snap.train_sensitive} == {"drop1", "drop2"}
    assert ModeSnapshot(PlainMLP()).state == "none"


def test_mode_map_marks_sensitive_and_frozen_modules():
    model = FineTuneNet().freeze_backbone()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record", frozen=["backbone.*"]) as guard:
        model.eval()
        rows = {r["name"]: r for r in guard.mode_map().to_dict()["modules"]}
    assert rows["backbone.bn"]["sensitive"] == "batchnorm" and rows["backbone.bn"]["frozen"]
    assert rows["backbone.drop"]["sensitive"] == "dropout" and rows["backbone.drop"]["frozen"]
    assert rows["fc"]["sensitive"] is None and not rows["fc"]["frozen"]
    assert rows["backbone.bn"]["training"] is False
    assert "eval()" in rows["backbone.bn"]["mode_set_at"]


# ---- models without sensitive modules ------------------------------------------------------


def _everything_wrong(model, opt):
    """Every mode mistake there is, on a model where modes change nothing."""
    model.eval()
    for _ in range(3):
        train_step(model, opt)
    model.train()
    with torch.no_grad():
        for seed in range(4):
            model(batch(seed=seed))
    for seed in range(4):
        model(batch(seed=seed)).sum().item()
    model.eval()
    for seed in range(4):
        model(batch(seed=seed)).sum().item()


@pytest.mark.parametrize(
    "make",
    [PlainMLP, lambda: HFStyleModel(dropout=0.0), lambda: MLP(p=0.0).apply(_drop_bn)],
    ids=["plain", "hf-dropout-0", "dropout-0-no-bn"],
)
def test_model_without_sensitive_modules_gets_no_mg101_or_mg201_above_info(make):
    model = make()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        _everything_wrong(model, opt)
        loud = [v for v in guard.violations if v.code in ("MG101", "MG201") and v.severity > modeguard.Severity.INFO]
    assert loud == []
    # The model is checked at all: the wasted eval graphs are still reported (info).
    assert "MG401" in {v.code for v in guard.violations}


def test_the_same_mistakes_on_a_sensitive_model_are_loud():
    # The contrast: _everything_wrong does trip MG101 and MG201 on a model with dropout.
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        _everything_wrong(model, opt)
        assert {"MG101", "MG201"} <= {v.code for v in guard.violations}


def _drop_bn(module):
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm1d):
            setattr(module, name, nn.Identity())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's own, on 2.13
def test_a_legacy_torchscript_submodule_is_watched_with_the_rest():
    # A ScriptModule subclass's forward is a descriptor that raises when read from the
    # class: its source cannot be read, and watching the model must not fail over it.
    class Legacy(torch.jit.ScriptModule):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        @torch.jit.script_method
        def forward(self, x):
            return self.lin(x)

    model = nn.Sequential(Legacy(), nn.Dropout(0.5), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(3, 4)).sum().backward()
            opt.step()
    assert guard.violations == [] and guard.models == []  # watched, then let go
