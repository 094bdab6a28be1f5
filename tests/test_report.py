"""Reports: Violation fields, guard.report() as text, rich, HTML and JSON, the mode map,
and the ModeSite recorded for train()/eval(), direct assignment and train() overrides."""

import inspect
import io
import json

import pytest
import torch
from rich.console import Console

import modeguard
from modeguard import ModeSite, Severity
from modeguard.observe import modes
from modeguard.report import SCHEMA_VERSION
from models import MLP, NormEvalNet, batch

pytestmark = pytest.mark.usefixtures("isolated")


@pytest.fixture
def buggy_guard():
    """A guard that saw MG101 (twice, one place) and MG401 (once), with the lines noted."""
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = modeguard.watch(model, opt, on_violation="record")
    lines = {}
    for _ in range(2):
        opt.zero_grad()
        model(batch(6)).sum().backward()
        opt.step()
    lines["eval"] = inspect.currentframe().f_lineno + 1
    model.eval()
    for _ in range(2):
        opt.zero_grad()
        model(batch(6)).sum().backward()
        lines["step"] = inspect.currentframe().f_lineno + 1
        opt.step()
    lines["unused"] = inspect.currentframe().f_lineno + 1
    model(batch(6))
    try:
        yield guard, model, lines
    finally:
        guard.unwatch()


# ---- Violation ----------------------------------------------------------------------------


def test_violation_fields(buggy_guard):
    guard, _, lines = buggy_guard
    by_code = {v.code: v for v in guard.violations}
    assert set(by_code) == {"MG101", "MG401"}
    v = by_code["MG101"]
    assert isinstance(v, modeguard.Violation)
    assert v.name == "step-in-eval"
    assert v.severity is Severity.ERROR
    assert v.model == "MLP"
    assert set(v.modules) == {"bn", "drop"}
    assert (v.location.file, v.location.line) == (__file__, lines["step"])
    assert v.location.function == "buggy_guard"
    assert v.mode_set_at.how == "MLP.eval()" and v.mode_set_at.training is False
    assert v.mode_set_at.location.line == lines["eval"]
    assert v.count == 2
    assert v.first_step == 2  # two good steps ran before it
    assert v.fix == modeguard.get_rule("MG101").fix
    info = by_code["MG401"]
    assert info.severity is Severity.INFO and info.count == 1
    assert info.location.line == lines["unused"]


def test_violation_message_says_what_where_why_and_fix(buggy_guard):
    guard, _, lines = buggy_guard
    v = next(v for v in guard.violations if v.code == "MG101")
    msg = v.message
    assert msg.startswith("MG101 step-in-eval [error]: ")
    assert f"{__file__}:{lines['step']}" in msg
    assert f"{__file__}:{lines['eval']}" in msg
    assert "modules: bn, drop" in msg or "modules: drop, bn" in msg
    assert "why:" in msg and "Dropout" in msg
    assert "fix:" in msg and "model.train()" in msg
    assert str(v) == msg


def test_violations_list_is_a_copy(buggy_guard):
    guard, _, _ = buggy_guard
    got = guard.violations
    got.clear()
    assert len(guard.violations) == 2


def test_clear_forgets(buggy_guard):
    guard, _, _ = buggy_guard
    assert guard.violations
    guard.clear()
    assert guard.violations == [] and len(guard.report()) == 0


# ---- Report ---------------------------------------------------------------------------------


def test_report_plain_text(buggy_guard):
    guard, _, lines = buggy_guard
    report = guard.report()
    assert len(report) == 2
    assert [v.code for v in report] == ["MG101", "MG401"]  # worst first
    text = str(report)
    assert "\x1b[" not in text  # no colour codes in plain text
    for needle in ("MG101 step-in-eval", "MG401 eval-graph-unused", "error", "info",
                   f"test_report.py:{lines['step']}", f"test_report.py:{lines['unused']}", "MLP.eval()"):
        assert needle in text, needle
    assert repr(report) == "<modeguard Report: 1 error, 0 warning, 1 info>"
    assert report.counts() == {"error": 1, "warning": 0, "info": 1}
    assert report.worst() is Severity.ERROR


def test_empty_report():
    model = MLP()
    with modeguard.watch(model, on_violation="record") as guard:
        model(batch(6))
        report = guard.report()
    assert len(report) == 0
    assert report.worst() is None
    assert "no train/eval mode problems" in str(report)
    assert report.to_dict()["violations"] == []
    assert report.to_dict()["counts"] == {"error": 0, "warning": 0, "info": 0}


def test_report_is_a_rich_renderable(buggy_guard):
    guard, _, _ = buggy_guard
    buf = io.StringIO()
    Console(file=buf, width=140, force_terminal=True, color_system="standard").print(guard.report())
    out = buf.getvalue()
    assert "MG101 step-in-eval" in out and "MG401" in out
    assert "\x1b[" in out  # coloured on a terminal


def test_report_html(buggy_guard):
    guard, _, _ = buggy_guard
    html = guard.report()._repr_html_()
    assert html.lstrip().startswith("<")
    assert "MG101" in html and "step-in-eval" in html
    assert "<script" not in html


def test_report_json_round_trip(buggy_guard):
    guard, _, lines = buggy_guard
    report = guard.report()
    data = json.loads(report.to_json())
    assert data == report.to_dict()
    assert set(data) == {"modeguard", "schema", "violations", "counts"}
    assert data["modeguard"] == modeguard.__version__
    assert data["schema"] == SCHEMA_VERSION == 1
    assert data["counts"] == {"error": 1, "warning": 0, "info": 1}
    v = data["violations"][0]
    assert set(v) == {"code", "name", "severity", "message", "model", "modules", "location", "mode_set_at", "count", "first_step"}
    assert v["code"] == "MG101" and v["severity"] == "error" and v["count"] == 2
    assert v["location"] == {"file": __file__, "line": lines["step"], "function": "buggy_guard"}
    assert v["mode_set_at"]["how"] == "MLP.eval()"
    assert v["mode_set_at"]["training"] is False
    assert v["mode_set_at"]["location"]["line"] == lines["eval"]
    assert v["message"] == guard.violations[0].message
    assert data["violations"][1]["mode_set_at"]["by"] is None


def test_report_to_dict_extra_keys(buggy_guard):
    guard, _, _ = buggy_guard
    data = json.loads(guard.report().to_json(indent=None, script="train.py"))
    assert data["script"] == "train.py"
    assert list(data)[:2] == ["modeguard", "schema"]


# ---- mode map -------------------------------------------------------------------------------


def test_mode_map_rows():
    model = NormEvalNet()
    with modeguard.watch(model, on_violation="record", frozen=["backbone.*"]) as guard:
        model.eval()
        model.train()
        model.fc.weight.requires_grad_(False)
        mm = guard.mode_map()
    rows = {r["name"]: r for r in mm.to_dict()["modules"]}
    assert mm.to_dict()["model"] == "NormEvalNet"
    assert list(rows) == ["", "backbone", "backbone.fc", "backbone.bn", "backbone.drop", "fc"]
    bn = rows["backbone.bn"]
    assert bn["type"] == "BatchNorm1d"
    assert bn["training"] is False
    assert bn["sensitive"] == "batchnorm"
    assert bn["frozen"] is True  # by the "backbone.*" pattern
    assert "override" in bn["mode_set_at"] and "NormEvalNet" in bn["mode_set_at"]
    head = rows["fc"]
    assert head["training"] is True and head["sensitive"] is None
    assert head["frozen"] is False  # its bias still trains
    assert "NormEvalNet.train()" in head["mode_set_at"]
    assert rows["backbone.fc"]["frozen"] is True


def test_mode_map_frozen_by_own_parameters_and_text():
    model = MLP()
    for p in model.bn.parameters():
        p.requires_grad_(False)
    with modeguard.watch(model, on_violation="record") as guard:
        model.eval()
        line = inspect.currentframe().f_lineno + 1
        model.drop.training = True
        mm = guard.mode_map()
        assert guard.mode_map(model).to_dict() == mm.to_dict()
    rows = {r["name"]: r for r in mm.rows}
    assert rows["bn"]["frozen"] is True and rows["fc1"]["frozen"] is False
    assert rows["drop"]["training"] is True
    assert rows["drop"]["mode_set_at"] == f"`.training = True` assigned directly at {__file__}:{line} in test_mode_map_frozen_by_own_parameters_and_text()"
    text = str(mm)
    assert text.splitlines()[0].startswith("MLP (MLP) eval")
    assert "bn (BatchNorm1d) eval sensitive:batchnorm frozen" in text
    assert "drop (Dropout) train sensitive:dropout" in text
    assert "<modeguard ModeMap of MLP: 5 modules>" == repr(mm)
    assert "BatchNorm1d" in mm._repr_html_()


def test_mode_map_needs_a_live_model():
    guard = modeguard.Guard(on_violation="record")
    try:
        with pytest.raises(ValueError, match="no live model"):
            guard.mode_map()
    finally:
        guard.unwatch()


# ---- ModeSite ---------------------------------------------------------------------------------


def test_mode_site_for_train_and_eval():
    model = MLP()
    with modeguard.watch(model, on_violation="record"):
        line = inspect.currentframe().f_lineno + 1
        model.eval()
        site = modes.last_set(model.bn)
        assert isinstance(site, ModeSite)
        assert site == modes.last_set(model) == modes.last_set(model.fc1)  # one site per call
        assert (site.training, site.how, site.by) == (False, "MLP.eval()", None)
        assert (site.location.file, site.location.line) == (__file__, line)
        assert site.describe() == f"MLP.eval() at {__file__}:{line} in test_mode_site_for_train_and_eval()"
        line = inspect.currentframe().f_lineno + 1
        model.bn.train()
        site = modes.last_set(model.bn)
        assert (site.training, site.how, site.location.line) == (True, "BatchNorm1d.train()", line)
        assert modes.last_set(model).how == "MLP.eval()"  # untouched modules keep theirs
        assert site.to_dict() == {
            "training": True, "how": "BatchNorm1d.train()", "by": None, "framework": None,
            "location": {"file": __file__, "line": line, "function": "test_mode_site_for_train_and_eval"},
        }


def test_mode_site_for_assignment_reported_in_violation():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        line = inspect.currentframe().f_lineno + 1
        model.bn.training = False
        opt.zero_grad()
        model(batch(6)).sum().backward()
        opt.step()
        (v,) = guard.violations
        assert v.code == "MG101" and v.modules == ["bn"]
        assert v.severity is Severity.WARNING  # only some modules were in eval
        assert v.mode_set_at.how == "assignment"
        assert (v.mode_set_at.location.file, v.mode_set_at.location.line) == (__file__, line)
        assert "assigned directly" in v.message


def test_mode_site_for_override():
    model = NormEvalNet()
    with modeguard.watch(model, on_violation="record"):
        model.eval()  # sites are recorded on changes: a fresh model is already in train
        line = inspect.currentframe().f_lineno + 1
        model.train()
        site = modes.last_set(model.backbone.bn)
        assert (site.how, site.by, site.training) == ("override", "NormEvalNet", False)
        assert (site.location.file, site.location.line) == (__file__, line)
        assert site.describe().startswith("set to eval by NormEvalNet.train() (an override)")
        root = modes.last_set(model)
        assert root.how == "NormEvalNet.train()" and root.location.line == line


def test_no_site_recorded_while_unwatched():
    model = MLP()
    model.eval()
    assert modes.last_set(model) is None
