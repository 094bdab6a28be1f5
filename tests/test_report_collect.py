"""Collecting violations (report/collect.py): one entry per rule, model and line, with a
running count, and the on-violation actions."""

import warnings

import pytest
import torch

import modeguard
from modeguard import _auto as auto
from modeguard.report.collect import ViolationLog, raise_on_violation, record_only, warn_on_violation
from modeguard.rules import RULES

from models import MLP, batch


def update(model, opt, x):
    """A training step shared by several models, as in a GAN or a multi-task script."""
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()


def _x():
    return batch(8)


def _pair():
    torch.manual_seed(0)
    a, b = MLP(), MLP()
    return a, torch.optim.SGD(a.parameters(), lr=0.1), b, torch.optim.SGD(b.parameters(), lr=0.1)


def test_two_models_with_the_same_bug_in_one_helper_are_two_entries(isolated):
    a, opt_a, b, opt_b = _pair()
    with modeguard.watch(a, opt_a, on_violation="record") as guard:
        guard.watch_model(b, name="critic")
        guard.watch_optimizer(opt_b)
        a.eval()
        b.eval()
        for _ in range(3):
            update(a, opt_a, _x())
            update(b, opt_b, _x())
        found = [(v.code, v.model, v.count) for v in guard.violations]
    assert found == [("MG101", "MLP", 3), ("MG101", "critic", 3)]
    assert len({(v.location.file, v.location.line) for v in guard.violations}) == 1  # the same line


def test_two_models_in_automatic_mode_are_two_entries(isolated):
    a, opt_a, b, opt_b = _pair()
    guard = auto.start(on_violation="record")
    try:
        a.eval()
        b.eval()
        for _ in range(2):
            update(a, opt_a, _x())
            update(b, opt_b, _x())
    finally:
        auto.stop()
    models = [v.model for v in guard.violations if v.code == "MG101"]
    assert len(models) == 2 and len(set(models)) == 2


def test_log_counts_a_recurrence_and_reports_an_escalation_once():
    rule = RULES["MG101"]
    log = ViolationLog()
    first = log.add(rule, modeguard.Severity.WARNING, "Net", ["bn"], None, None, "some modules in eval", 0)
    assert first is not None and first.count == 1
    assert log.add(rule, modeguard.Severity.WARNING, "Net", ["bn"], None, None, "some modules in eval", 1) is None
    worse = log.add(rule, modeguard.Severity.ERROR, "Net", ["bn", "drop"], None, None, "the model in eval", 2)
    assert worse is first and first.severity is modeguard.Severity.ERROR and first.count == 3
    assert first.modules == ["bn", "drop"] and first.first_step == 0
    assert log.add(rule, modeguard.Severity.WARNING, "Other", ["bn"], None, None, "x", 3) is not None
    assert len(log) == 2
    log.clear()
    assert list(log) == []


def _violation(severity):
    return ViolationLog().add(RULES["MG401"], severity, "Net", [], None, None, "an eval graph", 0)


def test_actions():
    rule = RULES["MG401"]
    record_only(rule, _violation(modeguard.Severity.ERROR))  # nothing happens
    with pytest.warns(modeguard.EvalGraphUnusedInfo) as rec:
        warn_on_violation(rule, _violation(modeguard.Severity.INFO))
    assert rec[0].message.violation.code == "MG401"
    with pytest.warns(modeguard.EvalGraphUnusedWarning):
        warn_on_violation(rule, _violation(modeguard.Severity.WARNING))
    with pytest.raises(modeguard.EvalGraphUnusedError) as exc:
        raise_on_violation(rule, _violation(modeguard.Severity.WARNING))
    assert exc.value.violation.code == "MG401"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        raise_on_violation(rule, _violation(modeguard.Severity.INFO))  # info is only warned
    assert [w.category for w in caught] == [modeguard.EvalGraphUnusedInfo]
