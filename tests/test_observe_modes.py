"""modeguard.observe.modes: where each mode change is recorded (ModeSite, last_set) for
train()/eval(), direct assignment and a model's own train() override; MODE_EPOCH and
STRUCTURE_EPOCH moving only while the patches are installed; listeners held weakly."""

import gc
import inspect
import weakref

import pytest
import torch
import torch.nn as nn

from modeguard._frames import Location
from modeguard.observe import modes, pickling
from modeguard.observe.modes import ModeSite
from models import MLP, NormEvalNet, Passthrough

pytestmark = pytest.mark.usefixtures("isolated")


def here() -> int:
    """The line of the call to here()."""
    return inspect.currentframe().f_back.f_lineno


class Listener:
    """The least a listener needs: an arm_roots() method."""

    def __init__(self):
        self.calls = 0

    def arm_roots(self):
        self.calls += 1


class Unhashable(nn.Module):
    """__eq__ without __hash__: the weak site table cannot key it."""

    def __eq__(self, other):
        return self is other

    __hash__ = None


# ---- ModeSite ----------------------------------------------------------------------------


def test_mode_site_describes_each_kind_of_change():
    loc = Location("/src/train.py", 12, "fit")
    assert ModeSite(False, "Net.eval()", loc).describe() == "Net.eval() at /src/train.py:12 in fit()"
    assert ModeSite(True, "assignment", loc).describe() == "`.training = True` assigned directly at /src/train.py:12 in fit()"
    assert ModeSite(False, "override", loc, by="Detector").describe() == (
        "set to eval by Detector.train() (an override), called from /src/train.py:12 in fit()"
    )
    assert ModeSite(True, "override", None, by="Detector").describe() == (
        "set to train by Detector.train() (an override), called from an unknown place"
    )
    assert ModeSite(True, "Net.train()", None).describe() == "Net.train() at an unknown place"


def test_mode_site_to_dict_and_immutability():
    loc = Location("/src/train.py", 12, "fit")
    assert ModeSite(False, "override", loc, by="Detector").to_dict() == {
        "training": False, "how": "override", "by": "Detector", "framework": None,
        "location": {"file": "/src/train.py", "line": 12, "function": "fit"},
    }
    assert ModeSite(True, "assignment", None).to_dict()["location"] is None
    with pytest.raises(AttributeError):
        ModeSite(True, "assignment", None).training = False


def test_hook_mark_is_the_one_pickling_strips():
    assert modes.HOOK_MARK == pickling.HOOK_MARK == "_modeguard_hook"


# ---- where modes were set ------------------------------------------------------------------


def test_nothing_is_recorded_without_the_patches(epochs):
    model = MLP()
    before = modes.MODE_EPOCH[0], modes.STRUCTURE_EPOCH[0]
    model.eval()
    model.bn.training = True
    model.add_module("extra", nn.Linear(2, 2))
    assert modes.last_set(model) is None and modes.last_set(model.bn) is None
    assert (modes.MODE_EPOCH[0], modes.STRUCTURE_EPOCH[0]) == before
    assert not modes.is_patched()


def test_is_patched_follows_acquire_and_release(epochs):
    train = nn.Module.__dict__["train"]
    modes.PATCHES.acquire()
    try:
        assert modes.is_patched()
        assert nn.Module.__dict__["train"] is not train
        assert isinstance(nn.Module.__dict__["training"], modes.TrainingFlag)
        assert isinstance(torch.jit.ScriptModule.__dict__["training"], modes.DictTraining)
    finally:
        modes.PATCHES.release()
    assert not modes.is_patched()
    assert nn.Module.__dict__["train"] is train
    # torch's classes define no `training` of their own (an annotation only): gone again
    assert "training" not in nn.Module.__dict__ and "training" not in torch.jit.ScriptModule.__dict__
    assert "training" not in torch.jit._trace.TracedModule.__dict__


def test_eval_records_one_site_for_every_module_it_changed(mode_patches):
    model = MLP()
    line = here() + 1
    model.eval()
    site = modes.last_set(model)
    assert site == ModeSite(False, "MLP.eval()", Location(__file__, line, "test_eval_records_one_site_for_every_module_it_changed"))
    assert all(modes.last_set(m) is site for m in model.modules())


def test_train_names_the_outermost_call_and_the_users_line(mode_patches):
    model = MLP().eval()
    line = here() + 1
    model.train()
    site = modes.last_set(model.drop)
    assert (site.training, site.how, site.by) == (True, "MLP.train()", None)
    assert (site.location.file, site.location.line) == (__file__, line)
    line = here() + 1
    model.bn.eval()  # a submodule's own call is named after the submodule
    bn = modes.last_set(model.bn)
    assert (bn.training, bn.how, bn.location.line) == (False, "BatchNorm1d.eval()", line)
    assert modes.last_set(model.drop) is site  # modules the call did not change keep theirs


def test_train_with_mode_as_keyword_and_through_the_class(mode_patches):
    model = MLP()
    model.train(mode=False)
    assert modes.last_set(model.bn).how == "MLP.eval()" and not model.bn.training
    nn.Module.train(model, True)
    assert modes.last_set(model.bn).how == "MLP.train()" and model.bn.training


def test_a_call_that_changes_nothing_keeps_the_earlier_site_and_epoch(mode_patches):
    model = MLP()
    model.eval()
    site, epoch = modes.last_set(model.bn), modes.MODE_EPOCH[0]
    model.eval()
    model.bn.training = False
    assert modes.last_set(model.bn) is site
    assert modes.MODE_EPOCH[0] == epoch


def test_direct_assignment_is_recorded_as_an_assignment(mode_patches):
    model = MLP()
    line = here() + 1
    model.drop.training = False
    site = modes.last_set(model.drop)
    assert (site.training, site.how, site.by) == (False, "assignment", None)
    assert site.location == Location(__file__, line, "test_direct_assignment_is_recorded_as_an_assignment")
    assert modes.last_set(model.bn) is None


def test_an_assignment_through_object_setattr_is_recorded_too(mode_patches):
    # A module class with its own __setattr__ that stores through object.__setattr__
    # (skipping nn.Module's) still changes the flag through modeguard's setter.
    model = MLP()
    line = here() + 1
    object.__setattr__(model.bn, "training", False)
    site = modes.last_set(model.bn)
    assert (site.training, site.how, site.location.line) == (False, "assignment", line)
    assert model.bn.training is False and model.bn.__dict__["training"] is False


def test_the_flag_stays_a_plain_instance_attribute_while_patched(mode_patches):
    # Reads, copies and pickles see what they see without modeguard: the value lives in
    # the instance's __dict__, and nothing but the flag's own name reaches modeguard.
    model = MLP()
    model.eval()
    assert model.__dict__["training"] is False and model.training is False
    assert "training" in vars(model) and isinstance(nn.Module.__dict__["training"], modes.TrainingFlag)
    built = nn.Linear(2, 2)  # construction is no mode change
    assert built.training is True and modes.last_set(built) is None
    del model.drop.training
    assert "training" not in model.drop.__dict__
    with pytest.raises(AttributeError):
        del model.drop.training


class Legacy(torch.jit.ScriptModule):
    """The old TorchScript API: a ScriptModule subclass with a script_method."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    @torch.jit.script_method
    def forward(self, x):
        return self.drop(x)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's own, on 2.13
@pytest.mark.parametrize("make", ["script", "trace", "legacy"])
def test_torchscript_modules_read_their_flag_as_without_modeguard(mode_patches, make):
    # TorchScript's module classes delete the Python attribute and serve `training` from
    # the C++ module through __getattr__: a read must still get there.
    def build():
        if make == "legacy":
            return Legacy()
        net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
        return torch.jit.script(net) if make == "script" else torch.jit.trace(net.eval(), torch.randn(2, 4))

    scripted = build()
    assert "training" not in scripted.__dict__
    assert scripted.training is (make != "trace")
    scripted.eval()
    assert scripted.training is False
    scripted.train()
    assert scripted.training is True


class ServedFlag(nn.Module):
    """A wrapper that deletes its own flag and answers from the module it wraps."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        del self.training

    def __getattr__(self, name):
        if name == "training":
            return self.inner.training
        return super().__getattr__(name)


def test_a_class_that_deletes_its_flag_is_served_by_its_getattr_and_restored_after(epochs):
    inner = nn.Dropout(0.5).eval()
    modes.PATCHES.acquire()
    try:
        wrapper = ServedFlag(inner)  # deletes through modeguard's setter
        assert wrapper.training is False
        inner.train()
        assert wrapper.training is True
        assert isinstance(ServedFlag.__dict__["training"], modes.DictTraining)
    finally:
        modes.PATCHES.release()
    assert "training" not in ServedFlag.__dict__ and wrapper.training is True


def test_a_tensor_assigned_as_the_flag_is_stored_as_without_modeguard(mode_patches):
    model = MLP()
    flag = torch.tensor([True, False])
    model.drop.training = flag  # cannot be compared with the old flag: nothing noted
    assert model.drop.__dict__["training"] is flag


def test_a_train_override_that_keeps_batchnorm_in_eval_is_recorded_as_an_override(mode_patches):
    model = NormEvalNet().eval()
    line = here() + 1
    model.train()
    bn = modes.last_set(model.backbone.bn)
    assert (bn.training, bn.how, bn.by) == (False, "override", "NormEvalNet")
    assert (bn.location.file, bn.location.line) == (__file__, line)
    root = modes.last_set(model)
    assert (root.training, root.how, root.location.line) == (True, "NormEvalNet.train()", line)
    assert modes.last_set(model.backbone.drop) is root


def test_an_override_that_passes_its_arguments_on_is_the_users_own_call(mode_patches):
    model = Passthrough()
    line = here() + 1
    model.eval()  # eval() -> Passthrough.train(False) -> nn.Module.train
    site = modes.last_set(model.bn)
    assert (site.how, site.by) == ("Passthrough.eval()", None)
    # the user's line, not the line inside the override
    assert (site.location.file, site.location.line) == (__file__, line)
    assert site.location.function == "test_an_override_that_passes_its_arguments_on_is_the_users_own_call"


def test_the_site_table_does_not_keep_modules_alive(mode_patches):
    model = MLP()
    model.eval()
    ref = weakref.ref(model.bn)
    del model
    gc.collect()
    assert ref() is None


def test_a_module_that_cannot_be_keyed_still_changes_mode_and_moves_the_epoch(mode_patches):
    module = Unhashable()
    epoch = modes.MODE_EPOCH[0]
    module.eval()
    module.training = True
    assert module.training is True
    assert modes.MODE_EPOCH[0] == epoch + 2  # counted, though its site could not be stored


# ---- the epochs ---------------------------------------------------------------------------


def test_installing_moves_both_epochs(epochs):
    before = modes.MODE_EPOCH[0], modes.STRUCTURE_EPOCH[0]
    modes.PATCHES.acquire()
    try:
        assert modes.MODE_EPOCH[0] > before[0] and modes.STRUCTURE_EPOCH[0] > before[1]
    finally:
        modes.PATCHES.release()


def test_mode_epoch_moves_on_every_real_mode_change(mode_patches):
    model = MLP()
    start, structure = modes.MODE_EPOCH[0], modes.STRUCTURE_EPOCH[0]
    model.eval()  # five modules change
    assert modes.MODE_EPOCH[0] == start + 5
    model.fc1.training = True
    assert modes.MODE_EPOCH[0] == start + 6
    modes.bump_mode_epoch()
    assert modes.MODE_EPOCH[0] == start + 7
    assert modes.STRUCTURE_EPOCH[0] == structure  # modes are not structure


def test_structure_epoch_moves_when_modules_or_parameters_are_registered(mode_patches):
    model = MLP()
    start, mode = modes.STRUCTURE_EPOCH[0], modes.MODE_EPOCH[0]
    model.head = nn.Identity()
    assert modes.STRUCTURE_EPOCH[0] == start + 1
    model.fc1.register_parameter("scale", nn.Parameter(model.fc1.bias.detach().clone()))
    assert modes.STRUCTURE_EPOCH[0] == start + 2
    assert modes.MODE_EPOCH[0] == mode  # a new module in train mode is no mode change


def test_structure_hooks_are_removed_with_the_patches(epochs):
    modes.PATCHES.acquire()
    modes.PATCHES.release()
    start = modes.STRUCTURE_EPOCH[0]
    MLP().add_module("extra", nn.Linear(2, 2))
    assert modes.STRUCTURE_EPOCH[0] == start


# ---- listeners -----------------------------------------------------------------------------


def test_a_listener_is_armed_after_mode_and_structure_changes(mode_patches):
    listener = Listener()
    model = MLP()
    modes.listen(listener)
    try:
        model.bn.eval()
        assert listener.calls == 1
        model.add_module("extra", nn.Identity())
        assert listener.calls == 2
        modes.bump_mode_epoch()
        assert listener.calls == 3
        model.bn.eval()  # no change: not armed
        assert listener.calls == 3
    finally:
        modes.unlisten(listener)
    model.bn.train()
    assert listener.calls == 3
    assert id(listener) not in modes.ON_EPOCH


def test_unlisten_twice_or_unknown_is_harmless(epochs):
    listener = Listener()
    modes.unlisten(listener)
    modes.listen(listener)
    modes.unlisten(listener)
    modes.unlisten(listener)
    assert id(listener) not in modes.ON_EPOCH


def test_listeners_are_held_weakly(mode_patches):
    listener, other, model = Listener(), Listener(), MLP()
    modes.listen(listener)
    modes.listen(other)
    ref = weakref.ref(listener)
    key = id(listener)
    del listener
    gc.collect()
    assert ref() is None  # ON_EPOCH did not keep it alive
    assert key not in modes.ON_EPOCH  # and its entry went with it
    try:
        model.eval()  # the dead one is not called; the live one still is (once per module)
        assert other.calls == 5
    finally:
        modes.unlisten(other)


# ---- modes set by a framework --------------------------------------------------------------

def _framework_functions():
    """A framework's mode handling, compiled as if installed in site-packages: a loop
    that calls train()/eval(), and a save/restore that assigns the flags back (Lightning's
    _ModuleMode)."""
    from modeguard import _frames

    site = _frames._SITE_DIRS[0]
    ns = {"__name__": "fakeframework.loops"}
    source = (
        "class Loop:\n"
        "    def evaluate(self, model):\n        model.eval()\n"
        "    def training_step(self, model):\n        model.train()\n"
        "class _ModuleMode:\n"
        "    def capture(self, model):\n        self.mode = {n: m.training for n, m in model.named_modules()}\n"
        "    def restore(self, model):\n"
        "        for n, m in model.named_modules():\n            m.training = self.mode[n]\n"
    )
    exec(compile(source, f"{site}fakeframework/loops.py", "exec"), ns)
    return ns["Loop"](), ns["_ModuleMode"]()


def test_a_framework_train_call_is_recorded_with_the_framework_and_the_users_call(mode_patches):
    loop, _ = _framework_functions()
    model = MLP()
    model.eval()
    line = inspect.currentframe().f_lineno + 1
    loop.training_step(model)
    site = modes.last_set(model.bn)
    assert (site.training, site.how, site.framework) == (True, "MLP.train()", "Loop.training_step (fakeframework)")
    assert (site.location.file, site.location.line) == (__file__, line)
    assert site.describe() == (f"MLP.train() by Loop.training_step (fakeframework), inside the call at "
                               f"{__file__}:{line} in {site.location.function}()")
    assert site.to_dict()["framework"] == "Loop.training_step (fakeframework)"


def test_a_framework_restoring_saved_modes_leaves_the_users_sites(mode_patches):
    loop, saved = _framework_functions()
    model = MLP()
    line = inspect.currentframe().f_lineno + 1
    model.bn.eval()  # the user's
    saved.capture(model)
    loop.evaluate(model)  # the framework's validation: eval(), then the restore
    assert modes.last_set(model.drop).framework == "Loop.evaluate (fakeframework)"
    saved.restore(model)
    assert model.training and not model.bn.training and model.drop.training
    assert modes.last_set(model.bn).location.line == line  # untouched: still the user's eval()
    # Never set by the user: no site at all, rather than the framework's restore.
    assert modes.last_set(model.drop) is None and modes.last_set(model) is None
