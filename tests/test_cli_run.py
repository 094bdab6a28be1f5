"""``modeguard run``: the program runs as under plain ``python``, its outcome is kept, and
the summary, exit status and JSON report say what modeguard found.

Subprocess tests go through ``python -m modeguard run`` exactly as users do; the rest
call ``modeguard._cli.main`` in-process, which runs the same code faster.
"""

import io
import json
import os
import re
import subprocess
import sys

import pytest

from modeguard import _auto as auto, _cli as cli
from modeguard._version import __version__
from modeguard.observe import modes
from modeguard.report.schema import REPORT_SCHEMA, validate

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(HERE, "scripts")
BUG = os.path.join(SCRIPTS, "validate_bug.py")
CORRECT = os.path.join(SCRIPTS, "correct.py")
WARNING_ONLY = os.path.join(SCRIPTS, "eval_in_train_mode.py")


def _line_of(path, marker):
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if marker in line:
                return n
    raise AssertionError(f"{marker} not in {path}")


def _subprocess(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread, as in the suite (conftest.py)
    env.pop("MODEGUARD", None)
    env.pop("FORCE_COLOR", None)
    return subprocess.run(
        [sys.executable, "-m", "modeguard", "run", *args],
        capture_output=True, text=True, cwd=cwd or HERE, env=env, timeout=300,
    )


@pytest.fixture
def run(monkeypatch, capsys):
    """cli.main(["run", ...]) in-process; returns (status, stdout, stderr)."""
    monkeypatch.delenv("MODEGUARD", raising=False)

    def _run(*args):
        try:
            status = cli.main(["run", *args])
        except SystemExit as exc:  # argparse's usage errors
            status = exc.code
        out, err = capsys.readouterr()
        return status, out, err

    yield _run
    assert not auto.active() and not modes.is_patched(), "modeguard run left watching on"


def _schema_errors(report):
    errors = validate(report)
    try:  # cross-check the small validator with the reference one when it is installed
        import jsonschema
    except ImportError:
        return errors
    ref = sorted(e.message for e in jsonschema.Draft202012Validator(REPORT_SCHEMA).iter_errors(report))
    assert bool(ref) == bool(errors), (ref, errors)
    return errors


# ---- end to end, through python -m modeguard ------------------------------------------


def test_validate_bug_exits_3_with_a_summary_and_a_valid_json_report(tmp_path):
    out = tmp_path / "report.json"
    proc = _subprocess("--report-json", str(out), BUG)
    assert proc.returncode == 3, proc.stderr
    assert "trained" in proc.stdout  # the program ran to its end
    step_line, mode_line = _line_of(BUG, "STEP-LINE"), _line_of(BUG, "MODE-SET-LINE")
    summary = proc.stderr
    assert "MG101 step-in-eval" in summary
    assert f"validate_bug.py:{step_line}" in summary and f"validate_bug.py:{mode_line}" in summary
    assert "exit status 3" in summary
    assert "\x1b[" not in summary  # plain text in a pipe

    report = json.loads(out.read_text())
    assert _schema_errors(report) == []
    assert report["modeguard"] == __version__ and report["schema"] == 1
    assert report["script"] == BUG and report["exit_status"] == 0
    (mg101,) = [v for v in report["violations"] if v["code"] == "MG101"]
    assert mg101["severity"] == "error" and mg101["model"] == "Net"
    assert set(mg101["modules"]) == {"bn", "drop"}
    assert mg101["location"] == {"file": BUG, "line": step_line, "function": "main"}
    assert mg101["mode_set_at"]["location"]["line"] == mode_line
    assert mg101["mode_set_at"]["how"] == "Net.eval()" and mg101["mode_set_at"]["training"] is False
    assert mg101["count"] == 8  # 4 steps in each of the two epochs after validate()
    assert report["counts"]["error"] == 1


def test_dataloader_workers_fork_and_spawn_with_a_dataset_defined_in_the_script():
    proc = _subprocess(os.path.join(SCRIPTS, "workers.py"), "fork", "spawn")
    assert proc.returncode == 0, proc.stderr
    assert "fork: 32 samples" in proc.stdout and "spawn: 32 samples" in proc.stdout
    assert "no train/eval mode problems" in proc.stderr


# ---- in-process ------------------------------------------------------------------------


def test_exception_keeps_its_traceback_and_exit_status_1(run):
    status, _, err = run(CORRECT, "--crash")
    assert status == 1
    assert "Traceback (most recent call last):" in err
    assert "RuntimeError: the script's own error" in err
    assert 'correct.py", line' in err and "in crash" in err
    # The traceback starts at the program, not in modeguard's runner or runpy.
    assert "runpy" not in err and "_runner.py" not in err
    assert err.index("RuntimeError") < err.index("modeguard: no train/eval mode problems")


def test_module_with_relative_import_and_its_arguments(run, tmp_path, monkeypatch):
    monkeypatch.chdir(SCRIPTS)  # `python -m` looks in the current directory
    out = tmp_path / "r.json"
    try:
        status, stdout, err = run("--report-json", str(out), "-m", "mgrun_pkg.train", "x", "--fail-on", "never")
    finally:
        for name in ("mgrun_pkg", "mgrun_pkg.helpers", "mgrun_pkg.train"):
            sys.modules.pop(name, None)
    assert status == 3, err  # the program's --fail-on is its own argument
    assert "module argv=['x', '--fail-on', 'never']" in stdout
    report = json.loads(out.read_text())
    assert _schema_errors(report) == []
    assert report["script"] == "-m mgrun_pkg.train"
    assert [v["code"] for v in report["violations"]] == ["MG101"]
    assert report["violations"][0]["location"]["file"].endswith(os.path.join("mgrun_pkg", "train.py"))


@pytest.mark.parametrize("args, expected", [
    (["missing_script.py"], "can't open file"),
    (["--rules", "MG401=loud", CORRECT], "argument --rules"),
    (["--rules", "MG999=off", CORRECT], "unknown rule 'MG999'"),
    (["--rules", "MG401", CORRECT], "expected CODE=SEVERITY"),
    (["--no-such-option", CORRECT], "unrecognized arguments: --no-such-option"),
    (["--fail", "never", CORRECT], "unrecognized arguments: --fail"),  # no abbreviations
    (["--fail-on", "sometimes", CORRECT], "invalid choice: 'sometimes'"),
    (["--backward-sample", "0", CORRECT], "argument --backward-sample: expected a positive integer, got '0'"),
    (["--backward-sample", "often", CORRECT], "argument --backward-sample: expected a positive integer"),
    (["-m", "no_such_package.train"], "no module named 'no_such_package.train'"),
    (["-m"], "argument -m: expected one argument"),
    (["--report-json", "/no/such/folder/r.json", CORRECT], "argument --report-json"),
    ([], "required: SCRIPT.py"),
])
def test_bad_usage_exits_2_with_one_error_line(run, args, expected):
    status, out, err = run(*args)
    assert status == 2, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0], err
    assert out == ""  # the program never started


ONE_SKIPPED_BACKWARD = """
import torch
import torch.nn.functional as F

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(6):
    opt.zero_grad()
    loss = F.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 2, (8,)))
    if step != 4:
        loss.backward()
    opt.step()
"""


def test_backward_sample_one_catches_a_single_skipped_backward(run, tmp_path):
    script = tmp_path / "skip_once.py"
    script.write_text(ONE_SKIPPED_BACKWARD)
    report = tmp_path / "r.json"
    status, out, err = run("--backward-sample", "1", "--fail-on", "warning", "--report-json", str(report), str(script))
    assert status == 3, err
    found = json.loads(report.read_text())["violations"]
    assert [(v["code"], v["location"]["line"]) for v in found] == [("MG602", 13)]


def test_correct_script_exits_0_and_reports_nothing(run):
    status, out, err = run(CORRECT, "--exit", "0")
    assert status == 0
    assert "no train/eval mode problems" in err and "models watched: Net" in err
    assert "MG" not in err


def test_script_argv_is_passed_through_including_options_modeguard_also_has(run):
    status, out, _ = run(CORRECT, "pos", "--quiet", "--rules", "x", "-m", "y")
    assert status == 0
    assert f"argv={[CORRECT, 'pos', '--quiet', '--rules', 'x', '-m', 'y']!r}" in out


def test_sys_exit_status_is_kept(run):
    status, _, err = run(CORRECT, "--exit", "5")
    assert status == 5
    assert "exit status 5 (the program's own)" in err


def test_fail_on_never_keeps_the_programs_status(run):
    status, _, err = run("--fail-on", "never", BUG)
    assert status == 0
    assert "MG101 step-in-eval" in err  # still reported


def test_fail_on_levels_with_a_warning_only_program(run):
    status, _, err = run(WARNING_ONLY)
    assert status == 0 and "MG201 eval-in-train-mode" in err
    status, _, _ = run("--fail-on", "warning", WARNING_ONLY)
    assert status == 3


def test_a_failing_program_keeps_its_own_status_even_with_violations(run):
    status, _, err = run(os.path.join(SCRIPTS, "mgrun_pkg", "train.py"))
    # Run as a plain file, the relative import fails exactly as under `python train.py`.
    assert status == 1
    assert "ImportError" in err and "relative import" in err


def test_quiet_prints_the_table_but_not_the_explanations(run):
    _, _, loud = run(BUG)
    _, _, quiet = run("--quiet", BUG)
    for text in (loud, quiet):
        assert "MG101 step-in-eval" in text and "exit status 3" in text
    assert "fix:" in loud and "fix:" not in quiet
    assert len(quiet) < len(loud)


def test_rules_option_changes_severities(run, tmp_path):
    out = tmp_path / "r.json"
    status, _, err = run("--rules", "MG101=off,MG201=error", "--report-json", str(out), WARNING_ONLY)
    assert status == 3  # MG201 raised to error
    report = json.loads(out.read_text())
    assert [(v["code"], v["severity"]) for v in report["violations"]] == [("MG201", "error")]
    status, _, _ = run("--rules", "MG101=off", BUG)
    assert status == 0


def test_on_violation_warn_shows_warnings_at_the_users_line(run):
    with pytest.warns(Warning) as record:
        status, _, _ = run("--on-violation", "warn", BUG)
    assert status == 3
    step_line = _line_of(BUG, "STEP-LINE")
    assert any(w.filename == BUG and w.lineno == step_line and "MG101" in str(w.message) for w in record)


def test_on_violation_raise_stops_the_program_with_the_rule_error(run):
    status, out, err = run("--on-violation", "raise", BUG)
    assert status == 3  # the program died of the raised error: a violation, so 3
    assert "StepInEvalError" in err and "trained" not in out
    assert "Traceback" in err  # the program's own traceback is still shown
    assert "MG101 step-in-eval" in err  # and the summary still lists it


def test_record_is_the_default_so_no_warnings_during_the_run(run, recwarn):
    status, _, _ = run(BUG)
    assert status == 3
    assert not [w for w in recwarn if "MG101" in str(w.message)]


def test_modeguard_env_off_runs_the_program_unchecked(run, monkeypatch):
    monkeypatch.setenv("MODEGUARD", "off")
    status, out, err = run(BUG)
    assert status == 0 and "trained" in out
    assert "checking is off" in err


def test_summary_is_a_rich_table_on_a_terminal(monkeypatch, capsys):
    monkeypatch.delenv("MODEGUARD", raising=False)

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(sys, "stderr", term)
    status = cli.main(["run", "--quiet", BUG])
    assert status == 3
    text = re.sub(r"\x1b\[[0-9;]*m", "", term.getvalue())
    assert "┃" in text or "│" in text  # a rich table, with box drawing
    assert "MG101 step-in-eval" in text and "Net.eval()" in text


def test_script_runs_as_main_with_its_folder_on_sys_path(run, tmp_path):
    (tmp_path / "sibling_mod_for_run.py").write_text("VALUE = 41\n")
    script = tmp_path / "uses_sibling.py"
    script.write_text(
        "import sys, pickle\n"
        "import sibling_mod_for_run\n"
        "class Point:\n"
        "    pass\n"
        "assert type(pickle.loads(pickle.dumps(Point()))) is Point\n"
        "if __name__ == '__main__':\n"
        "    print('main', sibling_mod_for_run.VALUE + 1, sys.path[0] == %r)\n" % str(tmp_path)
    )
    saved = sys.path[:]
    status, out, _ = run(str(script))
    assert status == 0 and "main 42 True" in out
    assert sys.path == saved  # restored for the caller
    sys.modules.pop("sibling_mod_for_run", None)


def test_json_report_is_written_when_the_program_crashes(run, tmp_path):
    out = tmp_path / "r.json"
    status, _, _ = run("--report-json", str(out), CORRECT, "--crash")
    assert status == 1
    report = json.loads(out.read_text())
    assert _schema_errors(report) == []
    assert report["exit_status"] == 1 and report["violations"] == []


# ---- the schema's own validator ----------------------------------------------------------


def test_schema_validator_rejects_broken_reports():
    good = {
        "modeguard": __version__, "schema": 1, "script": "x.py", "exit_status": 0, "rank": 1, "world_size": 2,
        "violations": [{
            "code": "MG101", "name": "step-in-eval", "severity": "error", "message": "m", "model": "Net",
            "modules": ["bn"], "location": {"file": "x.py", "line": 3, "function": "f"},
            "mode_set_at": None, "count": 1, "first_step": 0,
        }],
        "counts": {"error": 1, "warning": 0, "info": 0},
    }
    assert _schema_errors(good) == []

    def broken(edit):
        doc = json.loads(json.dumps(good))
        edit(doc)
        return _schema_errors(doc)

    assert broken(lambda d: d.pop("counts"))
    assert broken(lambda d: d.update(schema=2))
    assert broken(lambda d: d["violations"][0].update(severity="fatal"))
    assert broken(lambda d: d["violations"][0].update(count=0))
    assert broken(lambda d: d["violations"][0].update(code="X1"))
    assert broken(lambda d: d["violations"][0]["location"].update(line="3"))
    assert broken(lambda d: d["violations"][0].update(mode_set_at={"how": "x"}))
    assert broken(lambda d: d["violations"][0].update(extra=1))
    assert broken(lambda d: d.update(exit_status=True))
    assert broken(lambda d: d.update(rank=-1))
    assert broken(lambda d: d.update(rank="1"))
    assert broken(lambda d: d.update(world_size=0))
    assert not broken(lambda d: (d.pop("rank"), d.pop("world_size")))  # Report.to_json() has neither


def test_a_program_that_calls_no_model_is_not_said_to_be_unchecked(run, tmp_path):
    script = tmp_path / "no_model.py"
    script.write_text("print('nothing to train')\n")
    status, out, err = run(str(script))
    assert status == 0 and "nothing to train" in out
    assert "checking is off" not in err
    assert "no train/eval mode problems" in err and "none (no model was called)" in err
