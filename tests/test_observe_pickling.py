"""modeguard.observe.pickling: marked hooks are taken out of the state that copies and
pickles get (strip_hooks, the __getstate__ wrapper, module_reduce_ex); the user's own
hooks, and the state of modules without marked hooks, are left exactly as they were."""

import collections
import copy
import pickle

import pytest
import torch

from modeguard.observe import pickling
from models import MLP, OwnGetstate, batch

pytestmark = pytest.mark.usefixtures("isolated")


def users_pre_hook(module, args):  # module level, so that pickle can save it
    return None


def users_hook(module, args, kwargs, output):
    return output


def ours():
    """A hook function marked as modeguard's: a closure, which pickle could not save."""
    return pickling.mark(lambda *args: None)


def _hooked(model):
    """``model`` with a user pre-hook, a user forward hook with kwargs and always_call,
    and one marked hook of each kind; returns the ids of the marked ones."""
    model.register_forward_pre_hook(users_pre_hook)
    model.register_forward_hook(users_hook, with_kwargs=True, always_call=True)
    pre = model.register_forward_pre_hook(ours(), with_kwargs=True)
    post = model.register_forward_hook(ours(), with_kwargs=True, always_call=True)
    return pre.id, post.id


def _hook_fns(module):
    return list(module._forward_pre_hooks.values()), list(module._forward_hooks.values())


# ---- mark ---------------------------------------------------------------------------------


def test_mark_sets_the_attribute_and_returns_the_function():
    def fn():
        pass

    assert not getattr(fn, pickling.HOOK_MARK, False)
    assert pickling.mark(fn) is fn
    assert getattr(fn, pickling.HOOK_MARK) is True


# ---- strip_hooks ---------------------------------------------------------------------------


def test_state_without_marked_hooks_is_returned_as_it_is():
    model = MLP()
    model.register_forward_pre_hook(users_pre_hook)
    state = model.__dict__
    assert pickling.strip_hooks(state) is state
    bare = {"training": True}
    assert pickling.strip_hooks(bare) is bare


def test_marked_hooks_are_removed_and_the_users_kept_in_order():
    model = MLP()
    pre_id, post_id = _hooked(model)
    state = model.__dict__
    out = pickling.strip_hooks(state)
    assert out is not state
    assert list(out["_forward_pre_hooks"].values()) == [users_pre_hook]
    assert list(out["_forward_hooks"].values()) == [users_hook]
    assert type(out["_forward_pre_hooks"]) is type(state["_forward_pre_hooks"])
    # The bookkeeping dicts lose the marked ids and keep the user's.
    user_post_id = next(iter(out["_forward_hooks"]))
    assert pre_id not in out["_forward_pre_hooks_with_kwargs"]
    assert set(out["_forward_hooks_with_kwargs"]) == {user_post_id}
    assert set(out["_forward_hooks_always_called"]) == {user_post_id}
    # Everything else is the same objects; the module itself is untouched.
    assert all(out[k] is state[k] for k in state if not k.startswith("_forward_"))
    assert len(model._forward_pre_hooks) == 2 and len(model._forward_hooks) == 2
    assert post_id in model._forward_hooks_always_called


def test_strip_hooks_keeps_the_dict_type_of_each_entry():
    hooks = collections.OrderedDict([(1, ours()), (2, users_pre_hook)])
    state = {"_forward_pre_hooks": hooks, "_forward_pre_hooks_with_kwargs": collections.OrderedDict([(1, True), (2, True)])}
    out = pickling.strip_hooks(state)
    assert isinstance(out["_forward_pre_hooks"], collections.OrderedDict)
    assert list(out["_forward_pre_hooks"].items()) == [(2, users_pre_hook)]
    assert dict(out["_forward_pre_hooks_with_kwargs"]) == {2: True}
    assert list(hooks) == [1, 2]  # the input was copied, not changed


# ---- __getstate__ and __reduce_ex__ ---------------------------------------------------------


def test_getstate_wrapper_strips_what_the_wrapped_getstate_returns():
    model = MLP()
    _hooked(model)
    state = pickling.getstate_wrapper(lambda: model.__dict__, model, (), {})
    assert list(state["_forward_pre_hooks"].values()) == [users_pre_hook]


def test_module_reduce_ex_strips_the_state_and_keeps_the_rest():
    model = OwnGetstate()
    _hooked(model)
    plain = object.__reduce_ex__(model, 2)
    rv = pickling.module_reduce_ex(model, 2)
    assert rv[:2] == plain[:2] and rv[3:] == plain[3:]
    assert list(rv[2]["_forward_pre_hooks"].values()) == [users_pre_hook]
    assert list(rv[2]["_forward_hooks"].values()) == [users_hook]


def test_module_reduce_ex_without_marked_hooks_hands_over_the_state_unchanged(monkeypatch):
    model = MLP()
    model.register_forward_pre_hook(users_pre_hook)
    state = {"training": True, "_forward_pre_hooks": model._forward_pre_hooks}
    monkeypatch.setattr(MLP, "__getstate__", lambda self: state, raising=False)
    assert pickling.module_reduce_ex(model, 2)[2] is state


@pytest.mark.parametrize("make", [MLP, OwnGetstate], ids=["getstate", "own-getstate"])
def test_deepcopy_and_pickle_while_patched_drop_only_the_marked_hooks(mode_patches, make):
    torch.manual_seed(0)
    model = make()
    _hooked(model)
    with pytest.raises(Exception):
        pickle.dumps(model.__dict__["_forward_hooks"])  # the marked closure cannot be pickled
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        pre, post = _hook_fns(twin)
        assert [getattr(f, "__name__", None) for f in pre + post] == ["users_pre_hook", "users_hook"]
        assert twin._forward_hooks_always_called.keys() == twin._forward_hooks.keys()
        model.eval()
        twin.eval()
        with torch.no_grad():
            assert torch.equal(twin(batch()), model(batch()))  # the same model otherwise
    assert len(model._forward_pre_hooks) == 2  # the original keeps all of its hooks


def test_without_the_patches_a_copy_carries_the_marked_hooks():
    # The contrast: what the patches are for.
    model = MLP()
    _hooked(model)
    assert len(copy.deepcopy(model)._forward_hooks) == 2
