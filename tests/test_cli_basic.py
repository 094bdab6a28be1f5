"""The basic CLI commands: `rules` and `explain`, in process and as `python -m modeguard`."""

import subprocess
import sys

import pytest

import modeguard
from modeguard import cli


def _run(*args):
    return subprocess.run([sys.executable, "-m", "modeguard", *args], capture_output=True, text=True, timeout=120)


def test_rules_lists_every_rule(capsys):
    assert cli.main(["rules"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert len(lines) == len(modeguard.RULES)
    for line, (code, rule) in zip(lines, modeguard.RULES.items()):
        assert line.startswith(code)
        assert rule.name in line and rule.severity.label in line and rule.summary in line


@pytest.mark.parametrize("code", list(modeguard.RULES))
def test_explain_prints_the_rules_own_text(capsys, code):
    assert cli.main(["explain", code]) == 0
    out = capsys.readouterr().out
    rule = modeguard.get_rule(code)
    assert out.strip() == rule.explain().strip()
    assert out.startswith(f"{code} {rule.name} (default severity: {rule.severity.label})")
    assert rule.summary in out and rule.fix in out
    for quiet in rule.quiet_when:
        assert quiet in out
    assert f'rules={{"{code}": "off"}}' in out


def test_explain_accepts_name_and_lower_case(capsys):
    assert cli.main(["explain", "step-in-eval"]) == 0
    by_name = capsys.readouterr().out
    assert cli.main(["explain", "mg101"]) == 0
    assert capsys.readouterr().out == by_name


def test_explain_text_follows_the_rule_object(capsys, monkeypatch):
    rule = modeguard.get_rule("MG101")
    monkeypatch.setattr(type(rule), "fix", "a fix that exists only in this test.")
    assert cli.main(["explain", "MG101"]) == 0
    assert "Fix: a fix that exists only in this test." in capsys.readouterr().out


def test_explain_unknown_code_exits_2(capsys):
    assert cli.main(["explain", "BAD"]) == 2
    err = capsys.readouterr().err
    assert "unknown rule 'BAD'" in err and "MG101" in err


def test_python_dash_m_rules_and_explain():
    res = _run("rules")
    assert res.returncode == 0, res.stderr
    assert all(code in res.stdout for code in modeguard.RULES)
    res = _run("explain", "MG101")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == modeguard.get_rule("MG101").explain().strip()
    res = _run("explain", "BAD")
    assert res.returncode == 2
    assert res.stdout == ""
    assert "unknown rule 'BAD'" in res.stderr


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"modeguard {modeguard.__version__}"
