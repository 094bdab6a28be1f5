"""pytest plugin (entry point ``modeguard``; disable with ``-p no:modeguard``).

Two ways in: the ``modeguard`` fixture (``modeguard.watch(model, opt)`` inside a test),
and ``--modeguard``, which runs every test body under the same automatic watching as
``modeguard run``. Either way a test fails when a violation at or above the fail-on level
occurred, with the report as the failure message. Settings come from the command line,
then the environment, then the ini file, then the defaults. When neither is in use the
plugin only reads its options: it patches nothing and imports nothing heavy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

import pytest

from ._config import Config, ConfigError, FailOn, Severity, first_given, resolve, sources_of

ENV_ENABLE = "MODEGUARD_PYTEST"
ENV_FAIL_ON = "MODEGUARD_FAIL_ON"
ENV_RULES = "MODEGUARD_RULES"
INI_ENABLE = "modeguard"
INI_FAIL_ON = "modeguard_fail_on"
INI_RULES = "modeguard_rules"

DEFAULT_FAIL_ON = "warning"
#: Tests record: the failure message is the report.
_DEFAULTS = {"on_violation": "record", "fail_on": DEFAULT_FAIL_ON}
_LABELS = {
    "pytest": "command line", "ini:pytest": "ini",
    "fail_on": "--modeguard-fail-on", "ini:fail_on": f"ini option {INI_FAIL_ON}",
    "severities": "--modeguard-rules", "ini:severities": f"ini option {INI_RULES}",
}
#: How the report header names a source.
_HEADER_SOURCE = {"--modeguard-fail-on": "command line", "--modeguard-rules": "command line",
                  f"ini option {INI_FAIL_ON}": "ini", f"ini option {INI_RULES}": "ini"}

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def parse_fail_on(value, source: str = "fail_on") -> Optional[Severity]:
    """A fail-on level (``_config.FailOn``) -> the lowest failing severity, or None."""
    try:
        return FailOn.parse(value).threshold
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _rule_code(code: str) -> str:
    # Imported only when rules are named: the rules import torch, which a pytest run
    # that does not use modeguard never needs.
    from .rules import rule_code

    return rule_code(code)


def _label(level: Optional[Severity]) -> str:
    return level.label if level is not None else "never"


@dataclass(frozen=True)
class Settings:
    """The session's settings, and where each came from (for the report header)."""

    auto: bool = False
    auto_from: str = "default"
    config: Config = Config()

    @property
    def fail_on(self) -> Optional[Severity]:
        return self.config.fail_on.threshold

    @property
    def fail_on_from(self) -> str:
        source = self.config.sources.get("fail_on", "default")
        return _HEADER_SOURCE.get(source, source)

    @property
    def rules(self) -> str:
        return ",".join(f"{code}={sev.label}" for code, sev in self.config.severities.items())


@dataclass
class Plan:
    """What the plugin does for one test: its settings after markers are applied."""

    auto: bool
    fail_on: Optional[Severity]
    rules: dict
    config: Config = Config()
    frozen: tuple = ()


@dataclass
class Finding:
    """A violation below the fail-on level, kept for the terminal summary."""

    nodeid: str
    line: str


_SETTINGS = pytest.StashKey[Settings]()
_BELOW_THRESHOLD = pytest.StashKey[List[Finding]]()
_FIXTURE = pytest.StashKey["ModeGuardFixture"]()


# ---- options and settings -----------------------------------------------------------

def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("modeguard", "modeguard: catch PyTorch train/eval mode bugs")
    group.addoption(
        "--modeguard", action="store_true", default=None, dest="modeguard",
        help=f"watch every test's models and optimizers automatically and fail tests with "
             f"train/eval mode violations (env {ENV_ENABLE}=1, ini '{INI_ENABLE} = true').",
    )
    group.addoption(
        "--modeguard-fail-on", default=None, dest="modeguard_fail_on", metavar="LEVEL",
        choices=[level.value for level in FailOn],
        help=f"lowest severity that fails a test: error|warning|info|never (default {DEFAULT_FAIL_ON}; "
             f"env {ENV_FAIL_ON}, ini '{INI_FAIL_ON}').",
    )
    group.addoption(
        "--modeguard-rules", default=None, dest="modeguard_rules", metavar="CODE=SEV,...",
        help=f"rule severities, e.g. MG401=off,MG201=error (env {ENV_RULES}, ini '{INI_RULES}').",
    )
    parser.addini(INI_ENABLE, type="bool", default=False,
                  help="watch every test automatically (like --modeguard).")
    parser.addini(INI_FAIL_ON, default="",
                  help="lowest modeguard severity that fails a test: error|warning|info|never.")
    parser.addini(INI_RULES, default="", help="modeguard rule severities, e.g. MG401=off,MG201=error.")


def resolve_settings(config: pytest.Config) -> Settings:
    """Command line > environment > ini > default, through the one resolver
    (``_config.resolve``); every bad value, from any source, is a usage error."""
    enable = config.getoption("modeguard")
    ini_enable = config.getini(INI_ENABLE) or None  # an ini `false` is no choice at all
    source, raw = first_given(sources_of("pytest", {"pytest": enable}, {"pytest": ini_enable}, {}, _LABELS,
                                         os.environ, env=ENV_ENABLE))
    auto = False
    if isinstance(raw, str):
        key = raw.strip().lower()
        if key not in _TRUE + _FALSE:
            raise pytest.UsageError(f"{ENV_ENABLE}={raw!r}: expected 1 or 0 (true/false, yes/no, on/off)")
        auto = key in _TRUE
    elif raw is not None:
        auto = bool(raw)
    try:
        resolved = resolve(
            {"fail_on": config.getoption("modeguard_fail_on"), "severities": config.getoption("modeguard_rules")},
            ini={"fail_on": config.getini(INI_FAIL_ON), "severities": config.getini(INI_RULES)},
            defaults=_DEFAULTS, labels=_LABELS, rule_code=_rule_code,
        )
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    return Settings(auto, source or "default", resolved)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "modeguard(rules=None, fail_on=None, frozen=None): watch this test automatically "
        "with these modeguard settings and fail it on train/eval mode violations.",
    )
    config.addinivalue_line("markers", "no_modeguard: no automatic modeguard watching for this test.")
    config.stash[_SETTINGS] = resolve_settings(config)
    config.stash[_BELOW_THRESHOLD] = []


def pytest_report_header(config: pytest.Config):
    s = config.stash.get(_SETTINGS, None)
    if s is None or not s.auto:
        return None
    rules = f", rules {s.rules}" if s.rules else ""
    return (
        f"modeguard: watching every test for train/eval mode bugs (from {s.auto_from}), "
        f"fail-on {_label(s.fail_on)} (from {s.fail_on_from}){rules}"
    )


# ---- per test -----------------------------------------------------------------------

def _plan(item: pytest.Item) -> Plan:
    """The session settings, with the closest modeguard/no_modeguard marker applied."""
    s = item.config.stash[_SETTINGS]
    plan = Plan(auto=s.auto, fail_on=s.fail_on, rules=dict(s.config.severities), config=s.config)
    for mark in item.iter_markers():  # closest first: the test's own marker wins
        if mark.name == "no_modeguard":
            plan.auto = False
            break
        if mark.name == "modeguard":
            _apply_marker(plan, mark)
            break
    return plan


def _apply_marker(plan: Plan, mark) -> None:
    from ._config import parse_rules

    unknown = set(mark.kwargs) - {"rules", "fail_on", "frozen"}
    if mark.args or unknown:
        bad = ", ".join(sorted(unknown)) or "positional arguments"
        pytest.fail(f"@pytest.mark.modeguard takes only rules=, fail_on= and frozen= (got {bad})", pytrace=False)
    plan.auto = True
    try:
        if mark.kwargs.get("fail_on") is not None:
            plan.fail_on = parse_fail_on(mark.kwargs["fail_on"], "fail_on")
        if mark.kwargs.get("rules") is not None:
            plan.rules = {**plan.rules, **parse_rules(mark.kwargs["rules"], _rule_code)}
    except ValueError as exc:
        pytest.fail(f"@pytest.mark.modeguard: {exc}", pytrace=False)
    frozen = mark.kwargs.get("frozen")
    if frozen is not None:
        plan.frozen = (frozen,) if isinstance(frozen, str) else tuple(frozen)


def _wants_anything(item: pytest.Item) -> bool:
    """The fast path for tests that use no part of the plugin."""
    return (
        item.config.stash[_SETTINGS].auto
        or _FIXTURE in item.stash
        or item.get_closest_marker("modeguard") is not None
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    if not _wants_anything(item):
        return (yield)
    plan = _plan(item)
    watch = _AutoWatch(plan) if plan.auto else None
    fixture = item.stash.get(_FIXTURE, None)
    try:
        result = yield
    except BaseException:
        # The test failed on its own: keep that failure, add the report beside it.
        violations = _finish(watch, fixture)
        if violations:
            item.add_report_section("call", "modeguard", _report_text(violations))
        raise
    violations = _finish(watch, fixture)
    if violations:
        # The fixture starts from the same settings; a test may have changed its fail_on.
        fail_on = fixture.fail_on if fixture is not None else plan.fail_on
        _judge(item, violations, fail_on)
    return result


class _AutoWatch:
    """Automatic watching around one test body. If automatic watching is already on (the
    whole run is under ``modeguard run``), its guard is shared, not stopped."""

    def __init__(self, plan: Plan):
        from . import _auto as auto

        self._auto = auto
        self.owned = not auto.active()
        if self.owned:
            # Tests run few steps and must not depend on sampling: follow every forward.
            self.guard = auto.start(config=plan.config.replace(severities=plan.rules), frozen=plan.frozen)
            self._before = set()
        else:
            self.guard = auto.current()
            self._before = {id(v) for v in self.guard.violations}

    def stop(self) -> list:
        if self.owned and self._auto.current() is self.guard:
            self._auto.stop()
        return [v for v in self.guard.violations if id(v) not in self._before]


def _finish(watch: Optional[_AutoWatch], fixture: Optional["ModeGuardFixture"]) -> list:
    violations = watch.stop() if watch is not None else []
    if fixture is not None:
        for g in fixture.guards:
            g.report()  # the end of the test: graphs still alive and unused count now
        seen = {id(v) for v in violations}
        violations += [v for v in fixture.violations if id(v) not in seen]
        fixture._judged.update(id(v) for v in violations)
    return violations


def _report(violations):
    from .report import Report

    return Report(violations)


def _report_text(violations) -> str:
    """The report as plain text: ``str(report)``, the table, then each violation's message."""
    return str(_report(violations))


def _failure_message(failing: list, violations: list, fail_on: Severity) -> str:
    return (
        f"modeguard found {len(failing)} train/eval mode problem(s) at or above '{fail_on.label}' "
        f"in this test:\n{_report_text(violations)}"
    )


def _judge(item: pytest.Item, violations: list, fail_on: Optional[Severity]) -> None:
    failing = [v for v in violations if fail_on is not None and v.severity >= fail_on]
    below = [v for v in violations if v not in failing]
    if below:
        item.config.stash[_BELOW_THRESHOLD].extend(
            Finding(item.nodeid, f"{v.code} {v.name} [{v.severity.label}] at {v.location.short() if v.location else '?'}: {v.headline}")
            for v in below
        )
    if failing:
        pytest.fail(_failure_message(failing, violations, fail_on), pytrace=False)
    item.add_report_section("call", "modeguard", _report_text(violations))


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    findings = config.stash.get(_BELOW_THRESHOLD, None)
    if not findings:
        return
    terminalreporter.write_sep("=", "modeguard: findings below the fail-on level")
    for f in findings:
        terminalreporter.write_line(f"{f.nodeid}: {f.line}")


# ---- the fixture --------------------------------------------------------------------

class ModeGuardFixture:
    """What the ``modeguard`` fixture yields: ``modeguard.watch(model, opt)`` inside a test.

    The test fails when it finishes if a violation at or above ``fail_on`` occurred.
    Because the fixture's name hides the ``modeguard`` package inside the test, the
    package's ``frozen`` and ``allow`` are reachable from it too.
    """

    def __init__(self, fail_on: Optional[Severity] = Severity.WARNING, rules: Optional[dict] = None):
        self._fail_on = fail_on
        self.rules = dict(rules or {})
        self.guards: list = []
        self._owned: list = []
        self._judged: set = set()

    @property
    def fail_on(self) -> Optional[Severity]:
        return self._fail_on

    @fail_on.setter
    def fail_on(self, value) -> None:
        self._fail_on = value if value is None or isinstance(value, Severity) else parse_fail_on(value)

    def watch(self, model, *optimizers, **kwargs):
        """``modeguard.watch()`` that records instead of warning, and is undone after the test."""
        from . import _auto as auto
        from ._guard import guard_of, watch

        existing = guard_of(model)
        if existing is not None and existing is auto.current():
            guard = existing  # already found by automatic watching, which also sees every optimizer
        else:
            kwargs.setdefault("on_violation", "record")
            if self.rules:
                kwargs.setdefault("rules", self.rules)
            guard = watch(model, *optimizers, **kwargs)
            if guard is not existing and guard not in self._owned:
                self._owned.append(guard)
        if guard not in self.guards:
            self.guards.append(guard)
        return guard

    @property
    def violations(self) -> list:
        return [v for g in self.guards for v in g.violations]

    def report(self):
        return _report(self.violations)

    def failures(self) -> list:
        level = self.fail_on
        return [v for v in self.violations if level is not None and v.severity >= level]

    @staticmethod
    def frozen(*modules):
        from ._markers import frozen

        return frozen(*modules)

    @staticmethod
    def allow(*codes):
        from ._markers import allow

        return allow(*codes)

    def close(self) -> None:
        for g in self._owned:
            g.unwatch()


@pytest.fixture
def modeguard(request: pytest.FixtureRequest):
    plan = _plan(request.node)
    fx = ModeGuardFixture(fail_on=plan.fail_on, rules=plan.rules)
    request.node.stash[_FIXTURE] = fx
    try:
        yield fx
        # Violations after the test body (in other fixtures' teardown) were not judged yet.
        late = [v for v in fx.failures() if id(v) not in fx._judged]
        if late:
            pytest.fail(_failure_message(late, late, fx.fail_on), pytrace=False)
    finally:
        fx.close()
        del request.node.stash[_FIXTURE]
