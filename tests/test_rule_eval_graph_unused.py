"""MG401 eval-graph-unused: an info when an eval-mode forward with grad enabled builds a
graph that is freed without a backward; quiet when a backward does use it (FGSM,
saliency maps) and under no_grad/inference_mode."""

import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F

import modeguard
from models import MLP, PlainMLP, batch, labels, sgd, train_step

pytestmark = pytest.mark.usefixtures("isolated")


def here() -> int:
    return inspect.currentframe().f_back.f_lineno


def codes(guard, code="MG401"):
    return [v for v in guard.violations if v.code == code]


# ---- fires -----------------------------------------------------------------------------


def test_eval_forward_with_grad_enabled_is_an_info_at_the_forward_line():
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        train_step(model, opt)
        model.eval()
        for seed in range(3):
            line = here() + 1
            acc = (model(batch(seed=seed)).argmax(1) == labels()).float().mean().item()
            assert 0.0 <= acc <= 1.0
        found = codes(guard)
    assert len(found) == 1
    v = found[0]
    assert v.severity is modeguard.Severity.INFO
    assert v.location.file == __file__ and v.location.line == line
    assert v.count == 3
    assert "torch.no_grad()" in v.message
    assert [x for x in guard.violations if x.code != "MG401"] == []


def test_fires_for_a_model_without_sensitive_modules_too():
    # Wasted memory does not depend on dropout or BatchNorm.
    model = PlainMLP().eval()
    with modeguard.watch(model, on_violation="record") as guard:
        model(batch()).sum().item()
        assert [(v.code, v.severity) for v in guard.violations] == [("MG401", modeguard.Severity.INFO)]


def test_warn_mode_gives_an_info_warning_at_the_users_line():
    model = MLP().eval()
    with modeguard.watch(model):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            line = here() + 1
            model(batch()).sum().item()
            with torch.no_grad():
                model(batch(seed=1))  # any later hook call hands the freed graph to the rule
    ours = [w for w in caught if issubclass(w.category, modeguard.EvalGraphUnusedInfo)]
    assert len(ours) == 1
    assert issubclass(ours[0].category, modeguard.ModeGuardInfo)
    assert ours[0].filename == __file__ and ours[0].lineno == line


def test_raise_mode_does_not_raise_for_an_info():
    model = MLP().eval()
    with modeguard.watch(model, on_violation="raise") as guard:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            for seed in range(3):
                model(batch(seed=seed)).sum().item()
        assert [v.code for v in guard.violations] == ["MG401"]


def test_rule_can_be_turned_off_or_raised_to_warning():
    model = MLP().eval()
    with modeguard.watch(model, on_violation="record", rules={"MG401": "off"}) as guard:
        model(batch()).sum().item()
        assert guard.violations == []
    with modeguard.watch(model, on_violation="record", rules={"MG401": "warning"}) as guard:
        model(batch()).sum().item()
        assert [v.severity for v in guard.violations] == [modeguard.Severity.WARNING]


# ---- stays quiet -------------------------------------------------------------------------


def test_quiet_for_fgsm_adversarial_examples_in_eval_mode():
    model = MLP()
    opt = sgd(model)
    y = labels()
    with modeguard.watch(model, opt, on_violation="record") as guard:
        train_step(model, opt)
        model.eval()
        for seed in range(3):
            x = batch(seed=seed).requires_grad_(True)
            F.cross_entropy(model(x), y).backward()
            x_adv = (x + 0.1 * x.grad.sign()).detach()
            with torch.no_grad():
                model(x_adv)
        assert guard.violations == []


def test_quiet_for_saliency_maps_with_autograd_grad():
    model = MLP().eval()
    with modeguard.watch(model, on_violation="record") as guard:
        for seed in range(3):
            x = batch(seed=seed).requires_grad_(True)
            score = model(x).max(1).values.sum()
            (saliency,) = torch.autograd.grad(score, x)
            assert saliency.abs().sum() > 0
        assert guard.violations == []


def test_quiet_for_a_graph_used_through_one_of_several_outputs():
    model = MLP().eval()
    with modeguard.watch(model, on_violation="record") as guard:
        x = batch().requires_grad_(True)
        out = model(x)
        logits, probs = out, out.softmax(1)
        torch.autograd.grad(probs[:, 0].sum(), x)
        del logits, probs, out
        assert guard.violations == []


@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_quiet_under_no_grad(no_grad):
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        train_step(model, opt)
        model.eval()
        with no_grad():
            for seed in range(4):
                model(batch(seed=seed))
        model.train()
        train_step(model, opt)
        assert guard.violations == []


def test_quiet_under_allow():
    model = MLP().eval()
    with modeguard.watch(model, on_violation="record") as guard:
        with modeguard.allow("MG401"):
            model(batch()).sum().item()
        with torch.no_grad():
            model(batch())  # a later call drains the freed graph, outside allow()
        assert codes(guard) == []


@pytest.mark.parametrize(
    "rules, expected",
    [
        (None, {("MG401", modeguard.Severity.INFO), ("MG201", modeguard.Severity.WARNING)}),
        ({"MG401": "off", "MG201": "error"}, {("MG201", modeguard.Severity.ERROR)}),
    ],
    ids=["defaults", "overridden"],
)
def test_per_rule_overrides_change_and_turn_off_severities(rules, expected):
    model = MLP()
    with modeguard.watch(model, on_violation="record", rules=rules) as guard:
        model.eval()
        for seed in range(3):
            model(batch(seed=seed)).sum().item()  # MG401
        model.train()
        with torch.no_grad():
            for seed in range(3):
                model(batch(seed=seed))  # MG201
        assert {(v.code, v.severity) for v in guard.violations} == expected


# ---- graphs that outlive the report, and forwards that return no tensor ----------------------


class Recurrent(torch.nn.Module):
    """A cell whose state is fed back: `out, h = model(x, h)`."""

    def __init__(self):
        super().__init__()
        self.cell = torch.nn.GRUCell(8, 8)
        self.out = torch.nn.Linear(8, 3)

    def forward(self, x, h):
        h = self.cell(x, h)
        return self.out(h), h


def _generate(model, steps=5):
    h = torch.zeros(2, 8)
    outs = []
    for t in range(steps):
        line = here() + 1
        out, h = model(batch(2, seed=t), h)  # one graph, growing, never freed before the end
        outs.append(out.argmax(1))
    return outs, h, line


def test_a_graph_still_alive_at_unwatch_counts_as_unused():
    model = Recurrent().eval()
    guard = modeguard.watch(model, on_violation="record")
    _, h, line = _generate(model)  # h keeps the whole graph alive
    assert codes(guard) == []  # reading the findings mid-run does not judge live graphs
    guard.unwatch()
    found = codes(guard)
    assert len(found) == 1 and found[0].location.line == line and found[0].location.file == __file__
    del h


def test_a_graph_still_alive_at_report_counts_as_unused():
    model = Recurrent().eval()
    with modeguard.watch(model, on_violation="record") as guard:
        _, h, line = _generate(model)
        report = guard.report()
        assert [v.code for v in report] == ["MG401"]
        del h
        assert [v.count for v in guard.report()] == [report.violations[0].count]  # not counted twice


def test_a_graph_alive_at_report_and_backpropagated_later_is_not_counted_again():
    model = MLP().eval()
    with modeguard.watch(model, on_violation="record") as guard:
        x = batch().requires_grad_()
        out = model(x)
        out.sum().backward()  # a saliency map: used
        assert guard.report().violations == []
        del out


def test_an_eval_forward_that_returns_a_python_number_with_grad_enabled():
    class Evaluator(MLP):
        def forward(self, x, y):
            return F.cross_entropy(super().forward(x), y).item()

    model = Evaluator().eval()
    with modeguard.watch(model, on_violation="record") as guard:
        line = here() + 1
        loss = model(batch(), labels())
        assert isinstance(loss, float)
        found = codes(guard)
    assert len(found) == 1 and found[0].location.line == line


def test_quiet_for_a_python_number_under_no_grad_or_from_a_frozen_model():
    class Evaluator(MLP):
        def forward(self, x, y):
            return F.cross_entropy(super().forward(x), y).item()

    model = Evaluator().eval()
    with modeguard.watch(model, on_violation="record") as guard:
        with torch.no_grad():
            model(batch(), labels())
        for p in model.parameters():
            p.requires_grad_(False)
        model.train()
        model.eval()  # a mode change: requires_grad is read again
        model(batch(), labels())  # nothing requires grad: no graph was built
        assert guard.violations == []


def test_torch_jit_trace_of_a_watched_model_in_eval_is_not_evaluation():
    # Tracing runs the forward with grad enabled and keeps no graph: exporting the model,
    # which the user then runs elsewhere, is not an evaluation that wasted autograd.
    model = MLP()
    opt = sgd(model)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        train_step(model, opt)
        model.eval()
        traced = torch.jit.trace(model, batch())
        with torch.no_grad():
            assert torch.equal(traced(batch(seed=1)), model(batch(seed=1)))
        model.train()
        train_step(model, opt)
    assert guard.violations == []
