"""modeguard.observe.snapshot: what one ModeSnapshot says about a model's sensitive
modules (state, plain_train, train_bn, frozen_bn_in_train, needs_probe), what each
SensitiveEntry holds, and which modules walk_marked marks (frozen= patterns and
modeguard.frozen marks, and everything under them)."""

import gc

import pytest
import torch.nn as nn

from modeguard.observe import modes, sensitivity
from modeguard.observe.snapshot import ModeSnapshot, SensitiveEntry, walk_marked
from models import MLP, FineTuneNet, HFStyleBlock, MCDropoutNet, PlainMLP

pytestmark = pytest.mark.usefixtures("isolated")


@pytest.fixture
def marked(epochs):
    """modeguard.frozen-style marks on modules, taken off again when the test ends."""
    modules = []

    def mark(*ms):
        modules.extend(ms)
        sensitivity.mark_frozen(ms)

    yield mark
    sensitivity.unmark_frozen(modules)


def names(entries):
    return [e.name for e in entries]


# ---- state and plain_train --------------------------------------------------------------------


def test_state_follows_the_sensitive_modules_only():
    model = MLP()
    snap = ModeSnapshot(model)
    assert (snap.state, snap.root_training, snap.plain_train) == ("train", True, True)
    assert names(snap.entries) == ["bn", "drop"]  # the Linears have no mode to get wrong
    assert names(snap.train_sensitive) == ["bn", "drop"] and snap.eval_sensitive == ()

    model.eval()
    snap = ModeSnapshot(model)
    assert (snap.state, snap.plain_train) == ("eval", False)
    assert names(snap.eval_sensitive) == ["bn", "drop"] and snap.train_sensitive == ()

    model.drop.train()
    snap = ModeSnapshot(model)
    assert (snap.state, snap.plain_train) == ("mixed", False)
    assert names(snap.train_sensitive) == ["drop"] and names(snap.eval_sensitive) == ["bn"]


def test_a_model_without_sensitive_modules_is_none_in_either_mode():
    model = PlainMLP()
    snap = ModeSnapshot(model)
    assert (snap.state, snap.entries, snap.plain_train) == ("none", (), True)
    model.eval()
    snap = ModeSnapshot(model)
    assert (snap.state, snap.plain_train) == ("none", False)  # the root itself is in eval


def test_plain_train_needs_the_root_in_train_too():
    model = MLP().eval()
    model.bn.train()
    model.drop.train()  # every sensitive module trains, the root does not
    snap = ModeSnapshot(model)
    assert snap.state == "train" and not snap.root_training
    assert snap.plain_train is False


def test_a_sensitive_root_is_named_root():
    snap = ModeSnapshot(nn.Dropout(0.5))
    assert names(snap.entries) == ["(root)"] and snap.state == "train"


def test_a_snapshot_keeps_the_modes_it_was_built_with():
    model = MLP()
    snap = ModeSnapshot(model)
    model.eval()
    assert snap.state == "train" and snap.entries[0].training is True
    assert ModeSnapshot(model).state == "eval"


# ---- entries --------------------------------------------------------------------------------------


def test_entries_hold_kind_mode_and_parameters_of_each_module():
    model = MLP()
    bn, drop = ModeSnapshot(model).entries
    assert isinstance(bn, SensitiveEntry)
    assert (bn.kind, bn.training, bn.is_bn, bn.marked, bn.own_frozen, bn.param_free) == (
        "batchnorm", True, True, False, False, False)
    assert (drop.kind, drop.is_bn, drop.own_frozen, drop.param_free) == ("dropout", False, None, True)
    assert bn.ref() is model.bn and drop.ref() is model.drop


def test_an_entry_holds_its_module_weakly():
    model = MLP()
    entry = ModeSnapshot(model).entries[0]
    del model
    gc.collect()
    assert entry.ref() is None
    entry.refresh_frozen()  # a dead module is no error


def test_a_custom_module_counts_the_parameters_of_its_children():
    block = HFStyleBlock(dropout=0.1)
    (entry,) = ModeSnapshot(block).entries
    assert (entry.kind, entry.is_bn, entry.own_frozen) == ("custom", False, False)
    block.dense.requires_grad_(False)
    entry.refresh_frozen()
    assert entry.own_frozen is True


def test_a_batchnorm_counts_only_its_own_parameters():
    model = FineTuneNet()
    model.backbone.fc.requires_grad_(False)  # a sibling, not the BatchNorm's own
    entries = {e.name: e for e in ModeSnapshot(model).entries}
    assert entries["backbone.bn"].own_frozen is False
    model.backbone.bn.requires_grad_(False)
    assert entries["backbone.bn"].own_frozen is False  # read at snapshot time...
    entries["backbone.bn"].refresh_frozen()
    assert entries["backbone.bn"].own_frozen is True  # ...and on refresh


def test_an_entry_carries_where_its_mode_was_set(mode_patches):
    model = MLP()
    assert ModeSnapshot(model).entries[0].site is None  # never changed while watched
    model.eval()
    bn, drop = ModeSnapshot(model).entries
    assert bn.site is modes.last_set(model.bn) and bn.site.how == "MLP.eval()"
    assert drop.site is bn.site


# ---- BatchNorm in train ----------------------------------------------------------------------------


def test_train_bn_and_frozen_bn_in_train():
    model = FineTuneNet()
    snap = ModeSnapshot(model)
    assert names(snap.train_bn) == ["backbone.bn"]  # not the Dropout
    assert snap.frozen_bn_in_train == ()
    model.freeze_backbone()
    snap = ModeSnapshot(model)
    assert names(snap.frozen_bn_in_train) == ["backbone.bn"]
    model.backbone.bn.eval()
    snap = ModeSnapshot(model)
    assert snap.train_bn == () and snap.frozen_bn_in_train == ()  # in eval, as it should be


def test_a_half_frozen_or_parameter_free_batchnorm_is_not_frozen():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4, affine=False))
    model[1].weight.requires_grad_(False)  # its bias still trains
    snap = ModeSnapshot(model)
    assert names(snap.train_bn) == ["1", "2"]
    assert snap.frozen_bn_in_train == ()
    assert snap.entries[1].own_frozen is None


def test_refresh_frozen_rereads_requires_grad():
    model = FineTuneNet()
    snap = ModeSnapshot(model)
    model.freeze_backbone()
    assert snap.frozen_bn_in_train == ()  # requires_grad flips have no hook
    snap.refresh_frozen(snap.train_bn)
    assert names(snap.frozen_bn_in_train) == ["backbone.bn"]
    model.backbone.requires_grad_(True)
    snap.refresh_frozen()
    assert snap.frozen_bn_in_train == ()


# ---- needs_probe --------------------------------------------------------------------------------------


def test_needs_probe_lists_parameter_free_modules_in_eval_with_their_index():
    model = MCDropoutNet()
    assert ModeSnapshot(model).needs_probe() == ()  # all in train
    model.eval()
    snap = ModeSnapshot(model)
    probe = snap.needs_probe()
    assert [(i, e.name) for i, e in probe] == [(1, "drop1"), (2, "drop2")]  # not bn: it has parameters
    assert all(snap.entries[i] is e for i, e in probe)
    model.enable_mc_dropout()
    assert ModeSnapshot(model).needs_probe() == ()


def test_needs_probe_includes_a_batchnorm_without_parameters():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False)).eval()
    assert [e.name for _, e in ModeSnapshot(model).needs_probe()] == ["1"]


def test_needs_probe_leaves_out_marked_modules(marked):
    model = MCDropoutNet().eval()
    marked(model.drop2)
    snap = ModeSnapshot(model)
    assert [e.name for _, e in snap.needs_probe()] == ["drop1"]
    assert [e.name for _, e in ModeSnapshot(model, ["drop1"]).needs_probe()] == []


# ---- walk_marked -----------------------------------------------------------------------------------------


def _marks(root, patterns=()):
    return {name: marked for name, _, marked in walk_marked(root, patterns)}


def test_walk_marked_yields_every_module_once_with_nothing_marked():
    model = FineTuneNet()
    model.again = model.backbone.bn  # the same module under two names
    walked = list(walk_marked(model))
    assert [n for n, _, _ in walked] == ["", "backbone", "backbone.fc", "backbone.bn", "backbone.drop", "fc"]
    assert walked[3][1] is model.backbone.bn
    assert not any(m for _, _, m in walked)


def test_a_pattern_marks_the_module_and_everything_under_it():
    marks = _marks(FineTuneNet(), ["backbone.*"])
    assert marks == {"": False, "backbone": True, "backbone.fc": True, "backbone.bn": True,
                     "backbone.drop": True, "fc": False}
    marks = _marks(FineTuneNet(), ["backbone"])  # the module alone; its children through it
    assert marks["backbone"] and marks["backbone.bn"] and not marks["fc"]
    marks = _marks(FineTuneNet(), ["*.bn", "fc"])
    assert [n for n, m in marks.items() if m] == ["backbone.bn", "fc"]


def test_a_pattern_never_marks_the_root():
    marks = _marks(FineTuneNet(), ["*"])
    assert marks.pop("") is False and all(marks.values())


def test_a_frozen_mark_marks_everything_under_the_module(marked):
    model = FineTuneNet()
    marked(model.backbone)
    marks = _marks(model)
    assert [n for n, m in marks.items() if m] == ["backbone", "backbone.fc", "backbone.bn", "backbone.drop"]
    entries = {e.name: e.marked for e in ModeSnapshot(model).entries}
    assert entries == {"backbone.bn": True, "backbone.drop": True}


def test_a_frozen_root_marks_the_whole_model(marked):
    model = MLP()
    marked(model)
    assert all(_marks(model).values())


def test_snapshot_marks_by_pattern():
    snap = ModeSnapshot(FineTuneNet(), frozen_patterns=["backbone.drop"])
    assert {e.name: e.marked for e in snap.entries} == {"backbone.bn": False, "backbone.drop": True}
