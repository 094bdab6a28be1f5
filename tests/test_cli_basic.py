"""The basic CLI commands: `rules` and `explain`, in process and as `python -m modeguard`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import modeguard
from modeguard import _cli as cli


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


def _run_module(monkeypatch, *args):
    """``python -m modeguard ARGS`` in this interpreter (runs modeguard/__main__.py)."""
    # runpy.run_module would go through pytest's import hook (modeguard is a plugin).
    path = Path(modeguard.__file__).with_name("__main__.py")
    monkeypatch.setattr(sys, "argv", ["modeguard", *args])
    with pytest.raises(SystemExit) as exc:
        exec(compile(path.read_text(), str(path), "exec"), {"__name__": "__main__", "__package__": "modeguard"})
    return exc.value.code


def test_dash_m_rules_and_explain(capsys, monkeypatch):
    assert _run_module(monkeypatch, "rules") == 0
    out = capsys.readouterr().out
    assert all(code in out for code in modeguard.RULES)
    assert _run_module(monkeypatch, "explain", "MG101") == 0
    assert capsys.readouterr().out.strip() == modeguard.get_rule("MG101").explain().strip()


def test_python_dash_m_explain_bad_exits_2():
    """One real interpreter: the exit status reaches the shell."""
    res = _run("explain", "BAD")
    assert res.returncode == 2
    assert res.stdout == ""
    assert "unknown rule 'BAD'" in res.stderr


@pytest.mark.parametrize("args", [("explain", "MG101"), ("rules",)])
def test_a_reader_that_closes_early_ends_the_command_quietly(args):
    """`modeguard explain MG101 | head`: no BrokenPipeError traceback, status 1."""
    read_end, write_end = os.pipe()
    # The reader has exited before modeguard starts, so its first write finds the pipe
    # closed every time (with `head`, which may still be reading, only sometimes).
    subprocess.run([sys.executable, "-c", "import sys; sys.stdin.close()"], stdin=read_end, timeout=60)
    os.close(read_end)
    try:
        res = subprocess.run([sys.executable, "-m", "modeguard", *args], stdout=write_end,
                             stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert res.stderr == ""
    assert res.returncode == 1


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
