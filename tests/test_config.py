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


# ---- one resolver for every entry point ---------------------------------------------------


def test_resolve_precedence_explicit_env_ini_default():
    env = {"MODEGUARD_FAIL_ON": "warning", "MODEGUARD_BACKWARD_SAMPLE": "4"}
    c = resolve({"fail_on": "info"}, ini={"fail_on": "never", "backward_sample": "2"},
                defaults={"fail_on": "error", "backward_sample": 8}, environ=env)
    assert c.fail_on is modeguard.FailOn.INFO and c.sources["fail_on"] == "fail_on="
    assert c.backward_sample == 4 and c.sources["backward_sample"] == "MODEGUARD_BACKWARD_SAMPLE"
    c = resolve(ini={"fail_on": "never"}, defaults={"fail_on": "error"}, environ={})
    assert c.fail_on is modeguard.FailOn.NEVER and c.sources["fail_on"].startswith("ini")
    c = resolve(defaults={"fail_on": "warning"}, environ={})
    assert c.fail_on is modeguard.FailOn.WARNING and c.sources["fail_on"] == "default"
    assert resolve(environ={}) == Config()


def test_resolve_merges_rule_severities_code_by_code():
    c = resolve({"severities": {"MG401": "error"}}, ini={"severities": "MG401=off,MG201=info"},
                environ={"MODEGUARD_RULES": "MG201=error"}, rule_code=rule_code)
    assert c.severities == {"MG401": Severity.ERROR, "MG201": Severity.ERROR}


def test_resolve_reads_only_the_settings_an_entry_point_uses():
    c = resolve(environ={"MODEGUARD_FAIL_ON": "banana"}, settings=("on_violation",))
    assert c.fail_on is modeguard.FailOn.ERROR


def test_one_fail_on_vocabulary():
    FailOn = modeguard.FailOn
    assert [f.value for f in FailOn] == ["error", "warning", "info", "never"]
    assert FailOn.parse("warn") is FailOn.WARNING and FailOn.parse("off") is FailOn.NEVER
    assert FailOn.WARNING.fails(Severity.ERROR) and not FailOn.ERROR.fails(Severity.WARNING)
    assert not FailOn.NEVER.fails(Severity.ERROR) and FailOn.INFO.fails(Severity.INFO)
    with pytest.raises(ValueError, match="expected one of: error, warning, info, never"):
        FailOn.parse("sometimes")


@pytest.mark.parametrize("var, value, message", [
    ("MODEGUARD", "banana", "MODEGUARD='banana': unknown on_violation 'banana'"),
    ("MODEGUARD_RULES", "MG999=off", "MODEGUARD_RULES='MG999=off': unknown rule 'MG999'"),
    ("MODEGUARD_FAIL_ON", "sometimes", "MODEGUARD_FAIL_ON='sometimes': unknown level 'sometimes'"),
    ("MODEGUARD_BACKWARD_SAMPLE", "zero", "MODEGUARD_BACKWARD_SAMPLE='zero': expected a positive integer"),
])
def test_a_bad_environment_variable_is_one_usage_line_for_modeguard_run(monkeypatch, var, value, message):
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MODEGUARD")}
    env[var] = value
    proc = subprocess.run([sys.executable, "-m", "modeguard", "run", __file__], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert message in lines[-1] and lines[-1].startswith("modeguard run: error:")
    assert "Traceback" not in proc.stderr


def test_a_bad_environment_variable_for_watch_names_it(monkeypatch):
    import torch.nn as nn

    monkeypatch.setenv("MODEGUARD_RULES", "MG101=loud")
    with pytest.raises(ValueError, match="MODEGUARD_RULES='MG101=loud': unknown severity 'loud'"):
        modeguard.watch(nn.Linear(2, 2))
    monkeypatch.setenv("MODEGUARD_RULES", "")
    monkeypatch.setenv("MODEGUARD_FAIL_ON", "banana")  # not watch()'s business
    modeguard.watch(nn.Linear(2, 2)).unwatch()
