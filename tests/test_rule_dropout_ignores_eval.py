"""MG202 dropout-ignores-eval: fires when dropout keeps dropping inside an eval-mode forward
(F.dropout with training left at its default, scaled_dot_product_attention with an
unconditional dropout_p, a Dropout module built inside forward), at the line of the op or
of the user's call; quiet for training=self.training, a conditional dropout_p, Monte-Carlo
dropout (modules switched to train, training=True written out), allow(), train mode and
registered Dropout submodules; under modeguard.watch and automatic mode alike. The sample:
training forwards are never looked at, and an evaluation with unchanged modes once."""

import contextlib
import inspect
import re
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import modeguard
from modeguard import _auto as auto
from modeguard.observe import calls
from models import MLP, HFStyleModel, MCDropoutNet, batch, sgd, train_step

pytestmark = pytest.mark.usefixtures("isolated")

FEATURES = 8


def here() -> int:
    return inspect.currentframe().f_back.f_lineno


def codes(guard, code="MG202"):
    return [v for v in guard.violations if v.code == code]


@contextlib.contextmanager
def watching(mode, model, on_violation="record", **kwargs):
    """``modeguard.watch(model)`` or automatic mode; yields the guard."""
    if mode == "watch":
        with modeguard.watch(model, on_violation=on_violation, **kwargs) as guard:
            yield guard
    else:
        guard = auto.start(on_violation=on_violation, **kwargs)
        try:
            yield guard
        finally:
            auto.stop()


@pytest.fixture
def entered(monkeypatch):
    """How many times a sample's torch function mode was pushed."""
    count = [0]
    real = calls.CallWatch.__enter__

    def enter(self):
        count[0] += 1
        return real(self)

    monkeypatch.setattr(calls.CallWatch, "__enter__", enter)
    return count


def no_mode_left():
    return torch._C._len_torch_function_stack() == 0


# ---- the bugs, written here so that the reported line is in this file ------------------------

def _op_lines() -> dict:
    """The lines that end in an ``op`` comment naming the bug: where each is reported."""
    with open(__file__) as f:
        found = (re.search(r"  # op: (\w+)$", line.rstrip()) for line in f)
        return {m.group(1): i for i, m in enumerate(found, start=1) if m}


LINES = _op_lines()


class DefaultTraining(nn.Module):
    """F.dropout(x, p) with training left at its default True."""

    def __init__(self, p=0.3):
        super().__init__()
        self.fc = nn.Linear(FEATURES, FEATURES)
        self.p = p

    def forward(self, x):
        return F.dropout(self.fc(x), self.p)  # op: default


class UnconditionalAttention(nn.Module):
    """scaled_dot_product_attention(..., dropout_p=self.p) whatever the mode (timm #1978,
    torchtune #1049); ``conditional`` is the fix."""

    def __init__(self, p=0.1, conditional=False):
        super().__init__()
        self.qkv = nn.Linear(FEATURES, 3 * FEATURES)
        self.p = p
        self.conditional = conditional

    def forward(self, x):
        q, k, v = self.qkv(x).view(1, x.shape[0], 3, FEATURES).unbind(2)
        p = (self.p if self.training else 0.0) if self.conditional else self.p
        return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], dropout_p=p)[0, 0]  # op: sdpa


class AttentionNet(nn.Module):
    def __init__(self, conditional=False):
        super().__init__()
        self.attn = UnconditionalAttention(conditional=conditional)
        self.head = nn.Linear(FEATURES, 3)

    def forward(self, x):
        return self.head(self.attn(x))


class DropoutBuiltInForward(nn.Module):
    """``nn.Dropout(p)(x)`` inside forward: never a submodule, so always in train mode."""

    def __init__(self, cls=nn.Dropout):
        super().__init__()
        self.fc = nn.Linear(FEATURES, FEATURES)
        self.cls = cls

    def forward(self, x):
        return self.cls(0.3)(self.fc(x))  # op: built


class Net(nn.Module):
    """A buggy ``block`` inside a model, so the module name can be checked."""

    def __init__(self, block):
        super().__init__()
        self.block = block
        self.head = nn.Linear(FEATURES, 3)

    def forward(self, x):
        return self.head(self.block(x))


class ExplicitTraining(nn.Module):
    """Monte-Carlo dropout spelled out at the call site."""

    def __init__(self, positional=False):
        super().__init__()
        self.fc = nn.Linear(FEATURES, FEATURES)
        self.positional = positional

    def forward(self, x):
        h = self.fc(x)
        if self.positional:
            return F.dropout(h, 0.3, True)
        return F.dropout(h, p=0.3, training=True)


def _evaluate(model, n=3):
    model.eval()
    with torch.no_grad():
        for seed in range(n):
            model(batch(seed=seed))


MODES = ["watch", "auto"]


# ---- fires -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("make, line, headline", [
    (lambda: Net(DefaultTraining()), "default", "F.dropout() ran with training left at its default True"),
    (lambda: AttentionNet(), "sdpa", "scaled_dot_product_attention() ran with dropout_p=0.1"),
    (lambda: Net(DropoutBuiltInForward()), "built", "Dropout(p=0.3) ran in train mode in an eval-mode forward: it is not a submodule"),
    (lambda: Net(DropoutBuiltInForward(nn.AlphaDropout)), "built", "AlphaDropout(p=0.3) ran in train mode"),
    (lambda: Net(DropoutBuiltInForward(nn.FeatureAlphaDropout)), "built", "FeatureAlphaDropout(p=0.3) ran in train mode"),
], ids=["F.dropout", "sdpa", "nn.Dropout-in-forward", "nn.AlphaDropout-in-forward", "nn.FeatureAlphaDropout-in-forward"])
def test_dropout_in_an_eval_forward_fires_at_the_line_of_the_op(mode, make, line, headline):
    model = make()
    with watching(mode, model) as guard:
        _evaluate(model)
        found = codes(guard)
    assert len(found) == 1
    v = found[0]
    assert v.severity is modeguard.Severity.WARNING
    assert v.location.file == __file__ and v.location.line == LINES[line]
    assert v.location.function == "forward"
    assert headline in v.headline
    assert v.modules == (["block"] if isinstance(model, Net) else ["attn"])
    assert v.mode_set_at is not None and v.mode_set_at.how.endswith(".eval()")
    assert v.count == 1  # the first eval forward is sampled, the two after it are not
    assert no_mode_left()


@pytest.mark.parametrize("func, shape", [
    (F.dropout1d, (2, FEATURES, 4)), (F.dropout2d, (2, FEATURES, 4, 4)), (F.dropout3d, (2, FEATURES, 2, 2, 2)),
], ids=["dropout1d", "dropout2d", "dropout3d"])
def test_the_channel_dropouts_fire_too(func, shape):
    class Channels(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return func(x * self.scale, 0.5)  # op: channels

    model = Channels().eval()
    with modeguard.watch(model, on_violation="record") as guard:
        model(torch.randn(*shape))
        found = codes(guard)
    assert [(v.location.file, v.location.line) for v in found] == [(__file__, LINES["channels"])]
    assert "training left at its default" in found[0].headline


def test_warn_mode_warns_at_the_users_line():
    model = Net(DefaultTraining()).eval()
    with modeguard.watch(model):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                model(batch())
    ours = [w for w in caught if issubclass(w.category, modeguard.DropoutIgnoresEvalWarning)]
    assert len(ours) == 1
    assert ours[0].filename == __file__ and ours[0].lineno == LINES["default"]
    assert "training=self.training" in str(ours[0].message)


def test_raise_mode_raises_at_the_op_and_leaves_no_mode_behind():
    model = Net(DefaultTraining()).eval()
    with modeguard.watch(model, on_violation="raise"):
        with pytest.raises(modeguard.DropoutIgnoresEvalError) as exc:
            with torch.no_grad():
                model(batch())
        assert no_mode_left()
        with torch.no_grad():
            model(batch())  # not sampled again: no mode change
    assert not any(getattr(h, modeguard.observe.pickling.HOOK_MARK, False) for h in model._forward_hooks.values())


def test_fires_again_after_the_next_mode_change_with_a_running_count():
    model = Net(DefaultTraining())
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        for _ in range(3):
            model.train()
            train_step(model, opt)
            _evaluate(model, n=2)
        found = codes(guard)
    assert len(found) == 1 and found[0].count == 3


def test_grad_enabled_eval_forwards_are_sampled_too():
    model = Net(DefaultTraining()).eval()
    with modeguard.watch(model, on_violation="record", rules={"MG401": "off"}) as guard:
        model(batch()).sum().backward()
        assert [v.location.line for v in codes(guard)] == [LINES["default"]]


# ---- stays quiet ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("make", [
    HFStyleModel,                                   # F.dropout(x, p, training=self.training)
    lambda: AttentionNet(conditional=True),         # dropout_p=self.p if self.training else 0.0
    lambda: ExplicitTraining(),                     # training=True written out: MC dropout
    lambda: ExplicitTraining(positional=True),      # F.dropout(h, 0.3, True)
    MLP,                                            # a registered nn.Dropout, switched off by eval()
], ids=["training=self.training", "conditional-dropout_p", "training=True", "positional-True", "nn.Dropout-submodule"])
def test_quiet_for_calls_that_follow_the_mode_or_drop_on_purpose(mode, make):
    model = make()
    with watching(mode, model) as guard:
        _evaluate(model)
        assert codes(guard) == []


@pytest.mark.parametrize("mode", MODES)
def test_quiet_for_monte_carlo_dropout_with_modules_switched_to_train(mode):
    model = MCDropoutNet()
    with watching(mode, model, rules={"MG201": "off"}) as guard:
        model.enable_mc_dropout()
        with torch.no_grad():
            samples = torch.stack([model(batch()) for _ in range(4)])
        assert samples.std(0).sum() > 0  # it really dropped
        assert codes(guard) == []


@pytest.mark.parametrize("mode", MODES)
def test_quiet_when_the_module_making_the_call_was_switched_to_train(mode):
    model = AttentionNet()
    with watching(mode, model, rules={"MG201": "off"}) as guard:
        model.eval()
        model.attn.train()  # Monte-Carlo attention dropout, on purpose
        with torch.no_grad():
            model(batch())
        assert codes(guard) == []


@pytest.mark.parametrize("mode", MODES)
def test_quiet_under_allow(mode):
    model = Net(DefaultTraining())
    with watching(mode, model) as guard:
        with modeguard.allow("MG202"):
            _evaluate(model)
        assert codes(guard) == []


@pytest.mark.parametrize("mode", MODES)
def test_quiet_in_train_mode(mode):
    model = Net(DropoutBuiltInForward())
    opt = sgd(model)
    with watching(mode, model) as guard:
        model.train()
        for _ in range(3):
            train_step(model, opt)
        assert codes(guard) == []


def test_quiet_when_the_rule_is_off_and_nothing_is_sampled(entered):
    model = Net(DefaultTraining())
    with modeguard.watch(model, on_violation="record", rules={"MG202": "off"}) as guard:
        _evaluate(model)
        assert codes(guard) == []
    assert entered[0] == 0


# ---- the sample and its cost ------------------------------------------------------------------


class _FunctionLog(TorchFunctionMode):
    """Every torch function a block of code calls, in order. Attribute reads
    (``tensor.grad_fn``, which modeguard's followed forwards read) are not calls."""

    def __init__(self):
        super().__init__()
        self.funcs = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__qualname__", repr(func))
        if not name.endswith("__get__"):
            self.funcs.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", MODES)
def test_the_training_step_dispatches_no_extra_function(mode, entered, monkeypatch):
    seen = [0]
    real = calls.CallWatch.__torch_function__

    def spy(self, *args, **kwargs):
        seen[0] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(calls.CallWatch, "__torch_function__", spy)

    def run(watched):
        torch.manual_seed(0)
        model = MLP()
        opt = sgd(model)
        with (watching(mode, model) if watched else contextlib.nullcontext()):
            train_step(model, opt)  # the first forward after watching: snapshots settle
            with _FunctionLog() as log:
                for seed in range(20):
                    train_step(model, opt, batch(seed=seed))
        return log.funcs, [p.detach().clone() for p in model.parameters()]

    plain, plain_params = run(False)
    watched, watched_params = run(True)
    assert watched == plain and len(plain) > 100
    assert all(torch.equal(a, b) for a, b in zip(plain_params, watched_params))
    assert entered[0] == 0 and seen[0] == 0


@pytest.mark.parametrize("mode", MODES)
def test_an_evaluation_with_unchanged_modes_is_sampled_once(mode, entered):
    model = Net(DefaultTraining())
    opt = sgd(model)
    with watching(mode, model) as guard:
        train_step(model, opt)
        model.eval()
        with torch.no_grad():
            for seed in range(50):
                model(batch(seed=seed))
        assert entered[0] == 1
        model.train()
        train_step(model, opt)
        assert entered[0] == 1  # a training forward after a mode change: never sampled
        model.eval()
        with torch.no_grad():
            for seed in range(50):
                model(batch(seed=seed))
        assert entered[0] == 2
        assert codes(guard)[0].count == 2


def test_a_model_whose_modes_change_on_every_forward_is_sampled_at_the_bound(entered):
    # An RL policy: eval() and train() around every action. The first EVAL_SAMPLE_FIRST
    # evaluations are sampled, then one in EVAL_SAMPLE_EVERY.
    model = Net(DefaultTraining())
    guard = modeguard.watch(model, on_violation="record")
    first, every = guard.eval_sample_first, guard.eval_sample_every
    n = first + 4 * every
    try:
        for seed in range(n):
            model.eval()
            with torch.no_grad():
                model(batch(seed=seed))
            model.train()
    finally:
        guard.unwatch()
    assert entered[0] == first + 4
    assert codes(guard)[0].count == first + 4


@pytest.mark.parametrize("mode", MODES)
def test_a_sampled_forward_is_bit_identical_to_an_unwatched_one(mode):
    def run(watched):
        torch.manual_seed(0)
        model = Net(DropoutBuiltInForward()).eval()
        x = batch().requires_grad_(True)
        with (watching(mode, model) if watched else contextlib.nullcontext()):
            torch.manual_seed(1)
            out = model(x)
            out.sum().backward()
        return out.detach(), x.grad, [p.grad for p in model.parameters()]

    (out0, gx0, g0), (out1, gx1, g1) = run(False), run(True)
    assert torch.equal(out0, out1) and torch.equal(gx0, gx1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))


# ---- the mode always ends ------------------------------------------------------------------------


class Exploding(nn.Module):
    def __init__(self, exc):
        super().__init__()
        self.fc = nn.Linear(FEATURES, FEATURES)
        self.exc = exc

    def forward(self, x):
        h = F.dropout(self.fc(x), 0.3)
        if self.exc is not None:
            raise self.exc
        return h


def _our_hooks(model):
    return [h for h in model._forward_hooks.values() if getattr(h, modeguard.observe.pickling.HOOK_MARK, False)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("exc", [ValueError("bad batch"), KeyboardInterrupt()], ids=["ValueError", "KeyboardInterrupt"])
def test_a_forward_that_raises_leaves_no_mode_on(mode, exc):
    model = Exploding(exc).eval()
    with watching(mode, model) as guard:
        with pytest.raises(type(exc)) as info, torch.no_grad():
            model(batch())
        assert info.value is exc  # the user's exception, untouched
        assert len(codes(guard)) == 1  # found before the raise
        if isinstance(exc, ValueError):
            assert no_mode_left()  # popped by the always_call hook
        # Outside any forward nothing is reported, even with the mode still on.
        F.dropout(torch.ones(3), 0.5)
        model.exc = None
        with torch.no_grad():
            model(batch())  # its next forward cleans up whatever was left
        assert no_mode_left()
        assert (_our_hooks(model) == []) if mode == "auto" else (len(_our_hooks(model)) == 1)  # watch(): its own post-hook
        assert len(codes(guard)) == 1 and codes(guard)[0].count == 1
    assert no_mode_left() and _our_hooks(model) == []


@pytest.mark.parametrize("mode", MODES)
def test_a_users_own_torch_function_mode_nests_with_the_sample(mode):
    model = Net(DefaultTraining()).eval()
    x = batch()

    def logged(watched):
        torch.manual_seed(0)
        with (watching(mode, model) if watched else contextlib.nullcontext()) as guard:
            with _FunctionLog() as log, torch.no_grad():
                out = model(x)
            assert no_mode_left()
        return log.funcs, out, guard

    (plain, out0, _), (watched, out1, guard) = logged(False), logged(True)
    assert watched == plain  # the user's mode sees every call, as without modeguard
    assert torch.equal(out0, out1)
    assert [v.location.line for v in codes(guard)] == [LINES["default"]]


def test_a_users_mode_entered_inside_the_forward():
    class WithMode(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(FEATURES, FEATURES)
            self.log = None

        def forward(self, x):
            with _FunctionLog() as self.log:
                line = here() + 1
                out = F.dropout(self.fc(x), 0.2)
            self.line = line
            return out

    model = WithMode().eval()
    with modeguard.watch(model, on_violation="record") as guard:
        with torch.no_grad():
            model(batch())
        assert no_mode_left()
        assert "dropout" in model.log.funcs
        assert [v.location.line for v in codes(guard)] == [model.line]


def test_never_pushed_while_torch_compile_traces(monkeypatch):
    pushed_while_compiling = []
    real = calls.CallWatch.__enter__

    def enter(self):
        pushed_while_compiling.append(torch.compiler.is_compiling())
        return real(self)

    monkeypatch.setattr(calls.CallWatch, "__enter__", enter)
    model = Net(DefaultTraining()).eval()
    compiled = torch.compile(model, backend="eager")
    x = batch()
    with torch.no_grad():
        torch.manual_seed(0)
        ref = compiled(x)
        with modeguard.watch(model, on_violation="record"):
            torch.manual_seed(0)
            out = compiled(x)
            assert no_mode_left()
    assert torch.equal(ref, out)
    assert True not in pushed_while_compiling


def test_the_call_site_reader_sees_what_was_written():
    from modeguard._frames import call_shape

    def probe(*args, **kwargs):
        return shape_of_caller()

    def shape_of_caller():
        return call_shape(sys._getframe(2))

    assert probe(1, 2, training=True) == (2, frozenset({"training"}), False)
    assert probe(1,
                 2, 3) == (3, frozenset(), False)
    assert probe(*[1, 2]).unpacks and probe(**{"training": True}).unpacks
    exec("probe(1, 2)", {"probe": probe})  # no source to read: None, and no error


@pytest.mark.parametrize("grad", [False, True])
def test_a_model_on_torchs_transformer_fast_path_gives_the_same_bits_when_watched(grad):
    # nn.TransformerEncoder in eval takes a native fast path, which any torch function
    # mode (MG202's sample) turns off: other kernels, other last bits. Such a forward is
    # not sampled; with autograd on and trainable parameters there is no fast path, and
    # the sample goes ahead.
    def outputs(watch: bool):
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.1, batch_first=True)
        model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
        guard = modeguard.watch(model, opt, on_violation="record") if watch else None
        try:
            model.eval()
            with torch.set_grad_enabled(grad):
                return [model(x).detach() for _ in range(2)], guard.violations if guard else []
        finally:
            if guard is not None:
                guard.unwatch()

    (plain, _), (watched, found) = outputs(False), outputs(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, watched))
    assert [v.code for v in found] == (["MG401"] if grad else [])  # (evaluation outside no_grad)
