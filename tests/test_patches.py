"""modeguard._patches: Patches puts back exactly what it replaced (an attribute the class
defined, one it only inherited, one that did not exist), leaves a later patch by someone
else in place, and removes its hook handles; SharedPatches installs on the first user and
restores with the last. Everything here patches classes made for the test."""

import threading

import torch.nn as nn

from modeguard._patches import Patches, SharedPatches
from modeguard.observe import modes


class Base:
    def greet(self):
        return "base"

    def other(self):
        return "other"


def _classes():
    class Owner(Base):
        def greet(self):
            return "owner"

    return Owner


def _replacement(self):
    return "patched"


class Handle:
    """Stands in for torch's RemovableHandle."""

    def __init__(self):
        self.removed = 0

    def remove(self):
        self.removed += 1


# ---- Patches --------------------------------------------------------------------------------


def test_replace_and_restore_an_attribute_the_class_defines():
    Owner = _classes()
    original = Owner.__dict__["greet"]
    patches = Patches()
    patches.replace(Owner, "greet", _replacement)
    assert Owner().greet() == "patched"
    patches.restore()
    assert Owner.__dict__["greet"] is original and Owner().greet() == "owner"


def test_an_inherited_attribute_is_deleted_again_not_copied_down():
    Owner = _classes()
    patches = Patches()
    patches.replace(Owner, "other", _replacement)
    assert Owner().other() == "patched" and Base().other() == "other"
    patches.restore()
    assert "other" not in Owner.__dict__  # not Base.other copied onto Owner
    assert Owner().other() == "other"
    Base.other, saved = (lambda self: "changed"), Base.other
    try:
        assert Owner().other() == "changed"  # still inherited
    finally:
        Base.other = saved


def test_an_attribute_nobody_defined_is_deleted_again():
    Owner = _classes()
    patches = Patches()
    patches.replace(Owner, "extra", 42)
    assert Owner.extra == 42
    patches.restore()
    assert not hasattr(Owner, "extra")


def test_someone_elses_later_patch_is_left_in_place():
    Owner = _classes()
    patches = Patches()
    patches.replace(Owner, "greet", _replacement)
    patches.replace(Owner, "other", _replacement)

    def theirs(self):
        return "theirs"

    Owner.greet = theirs
    patches.restore()
    assert Owner.__dict__["greet"] is theirs  # not ours, and not the original over theirs
    assert "other" not in Owner.__dict__  # the one nobody touched is restored as usual


def test_the_same_attribute_replaced_twice_comes_back_to_the_original():
    Owner = _classes()
    original = Owner.__dict__["greet"]
    patches = Patches()
    patches.replace(Owner, "greet", _replacement)
    patches.replace(Owner, "greet", lambda self: "again")
    assert Owner().greet() == "again"
    patches.restore()  # in reverse order
    assert Owner.__dict__["greet"] is original


def test_handles_are_removed_once_with_the_patches():
    Owner = _classes()
    patches = Patches()
    assert not patches
    h = Handle()
    patches.add_handle(h)
    assert patches
    patches.replace(Owner, "greet", _replacement)
    patches.restore()
    assert h.removed == 1 and not patches
    patches.restore()  # nothing left to undo
    assert h.removed == 1 and Owner().greet() == "owner"


def test_a_patches_object_can_be_used_again_after_restore():
    Owner = _classes()
    patches = Patches()
    for _ in range(2):
        patches.replace(Owner, "greet", _replacement)
        assert Owner().greet() == "patched"
        patches.restore()
        assert Owner().greet() == "owner"


# ---- SharedPatches --------------------------------------------------------------------------


def _shared():
    Owner = _classes()
    installs = []

    def install(patches):
        installs.append(patches)
        patches.replace(Owner, "greet", _replacement)

    return Owner, installs, SharedPatches(install)


def test_installed_with_the_first_user_and_restored_with_the_last():
    Owner, installs, shared = _shared()
    assert shared.users == 0 and Owner().greet() == "owner" and not installs
    shared.acquire()
    shared.acquire()
    assert shared.users == 2 and len(installs) == 1 and Owner().greet() == "patched"
    shared.release()
    assert shared.users == 1 and Owner().greet() == "patched"
    shared.release()
    assert shared.users == 0 and Owner().greet() == "owner"


def test_a_release_too_many_does_not_go_below_zero():
    Owner, installs, shared = _shared()
    shared.release()
    assert shared.users == 0
    shared.acquire()  # so the next acquire still installs
    assert len(installs) == 1 and Owner().greet() == "patched"
    shared.release()
    shared.release()
    assert shared.users == 0 and Owner().greet() == "owner"


def test_installed_again_after_the_last_release():
    Owner, installs, shared = _shared()
    for n in (1, 2):
        shared.acquire()
        assert len(installs) == n and Owner().greet() == "patched"
        shared.release()
        assert Owner().greet() == "owner"


def test_an_install_that_fails_leaves_nothing_and_counts_no_user():
    class Owner:
        attr = "original"

    def install(patches):
        patches.replace(Owner, "attr", "ours")
        raise RuntimeError("halfway")

    shared = SharedPatches(install)
    try:
        shared.acquire()
    except RuntimeError:
        pass
    else:
        raise AssertionError("the install's error must reach the caller")
    assert Owner.attr == "original" and shared.users == 0
    calls = []
    shared._install = lambda patches: (calls.append(1), patches.replace(Owner, "attr", "ours"))
    shared.acquire()  # the next user tries the install again
    assert calls == [1] and Owner.attr == "ours"
    shared.release()
    assert Owner.attr == "original"


def test_users_from_many_threads_install_once():
    Owner, installs, shared = _shared()
    start = threading.Barrier(8)

    def user():
        start.wait()
        shared.acquire()

    threads = [threading.Thread(target=user) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert shared.users == 8 and len(installs) == 1
    finally:
        for _ in range(8):
            shared.release()
    assert Owner().greet() == "owner"


# ---- modeguard's own set, on nn.Module ------------------------------------------------------


def test_the_mode_patches_leave_a_later_patch_on_nn_module_and_restore_the_rest(epochs):
    originals = {name: nn.Module.__dict__[name] for name in ("train", "__setattr__", "__getstate__", "compile")}
    modes.PATCHES.acquire()
    try:
        ours = nn.Module.__dict__["train"]
        assert ours is not originals["train"] and "__reduce_ex__" in nn.Module.__dict__

        def theirs(self, mode=True):
            return ours(self, mode)

        nn.Module.train = theirs  # another library patches over modeguard's wrapper
    finally:
        modes.PATCHES.release()
    try:
        assert nn.Module.__dict__["train"] is theirs
        assert nn.Module.__dict__["__setattr__"] is originals["__setattr__"]
        assert nn.Module.__dict__["__getstate__"] is originals["__getstate__"]
        assert nn.Module.__dict__["compile"] is originals["compile"]
        assert "__reduce_ex__" not in nn.Module.__dict__  # torch's class does not define it
        assert "training" not in nn.Module.__dict__  # nor this: an annotation only
    finally:
        nn.Module.train = originals["train"]
