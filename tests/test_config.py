"""Configuration parsing: severities, on_violation actions, per-rule overrides, and the
Config repr that shows only what differs from the defaults."""

import pytest

import modeguard
from modeguard import OnViolation, Severity
from modeguard._config import Config, parse_rules, resolve
from modeguard.rules import rule_code


def parse_rule_overrides(rules):
    return parse_rules(rules, rule_code)


@pytest.mark.parametrize("raw, expected", [
    ("off", Severity.OFF), ("OFF", Severity.OFF), ("ignore", Severity.OFF), ("none", Severity.OFF),
    ("info", Severity.INFO), (" Info ", Severity.INFO),
    ("warning", Severity.WARNING), ("warn", Severity.WARNING),
    ("error", Severity.ERROR), ("err", Severity.ERROR),
    (Severity.ERROR, Severity.ERROR),
])
def test_severity_parse(raw, expected):
    assert Severity.parse(raw) is expected


@pytest.mark.parametrize("raw", ["loud", "", "warnings", 2, None])
def test_severity_parse_rejects_with_valid_list(raw):
    with pytest.raises(ValueError, match="expected one of: off, info, warning, error"):
        Severity.parse(raw)


def test_severity_order_and_label():
    assert Severity.OFF < Severity.INFO < Severity.WARNING < Severity.ERROR
    assert [s.label for s in Severity] == ["off", "info", "warning", "error"]


@pytest.mark.parametrize("raw, expected", [
    ("warn", OnViolation.WARN), ("RAISE", OnViolation.RAISE), (" record ", OnViolation.RECORD),
    ("off", OnViolation.OFF), (OnViolation.RAISE, OnViolation.RAISE),
])
def test_on_violation_parse(raw, expected):
    assert OnViolation.parse(raw) is expected


@pytest.mark.parametrize("raw", ["warning", "error", "", 1, None])
def test_on_violation_parse_rejects_with_valid_list(raw):
    with pytest.raises(ValueError) as exc:
        OnViolation.parse(raw)
    for value in ("'warn'", "'raise'", "'record'", "'off'"):
        assert value in str(exc.value)


def test_parse_rule_overrides_dict():
    got = parse_rule_overrides({"MG401": "off", "mg201": "error", "step-in-eval": Severity.INFO})
    assert got == {"MG401": Severity.OFF, "MG201": Severity.ERROR, "MG101": Severity.INFO}


def test_parse_rule_overrides_string():
    assert parse_rule_overrides("MG401=off,MG201=error") == {"MG401": Severity.OFF, "MG201": Severity.ERROR}
    assert parse_rule_overrides(" MG401 = off , , MG602=warn ") == {"MG401": Severity.OFF, "MG602": Severity.WARNING}
    assert parse_rule_overrides("") == {}
    assert parse_rule_overrides(None) == {}


def test_parse_rule_overrides_errors():
    with pytest.raises(ValueError, match="CODE=SEVERITY"):
        parse_rule_overrides("MG401")
    with pytest.raises(ValueError) as exc:
        parse_rule_overrides("MG999=off")
    assert all(code in str(exc.value) for code in modeguard.RULES)
    with pytest.raises(ValueError, match="unknown severity 'loud'"):
        parse_rule_overrides({"MG401": "loud"})
    with pytest.raises(TypeError, match="mapping"):
        parse_rule_overrides(["MG401"])


def test_config_repr_shows_only_differences():
    assert repr(Config()) == "Config()"
    r = repr(Config(on_violation=OnViolation.RAISE))
    assert r.startswith("Config(on_violation=") and "RAISE" in r and "severities" not in r
    assert "severities" in repr(Config(severities={"MG401": Severity.OFF}))


def env_on_violation():
    """The action the environment chooses, if any (None: it chooses nothing)."""
    config = resolve(settings=("on_violation",))
    return config.on_violation if config.sources.get("on_violation") == "MODEGUARD" else None


def test_env_on_violation(monkeypatch):
    monkeypatch.delenv("MODEGUARD", raising=False)
    assert env_on_violation() is None
    monkeypatch.setenv("MODEGUARD", "")
    assert env_on_violation() is None
    monkeypatch.setenv("MODEGUARD", "Record")
    assert env_on_violation() is OnViolation.RECORD
    monkeypatch.setenv("MODEGUARD", "loud")
    with pytest.raises(ValueError, match="MODEGUARD='loud'"):
        env_on_violation()


def test_disabled_rule_is_not_subscribed(monkeypatch):
    monkeypatch.delenv("MODEGUARD", raising=False)
    guard = modeguard.Guard(rules={"MG101": "off", "MG602": "off"}, on_violation="record")
    try:
        step_codes = {r.code for r in guard.step_rules}
        assert "MG101" not in step_codes and "MG602" not in step_codes
        assert "MG301" in step_codes
    finally:
        guard.unwatch()
