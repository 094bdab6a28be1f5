"""Golden files: the texts users read about violations, committed under tests/golden/ and
compared here, so that a change to any of them is a reviewed diff.

    MODEGUARD_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_golden.py tests/test_integrations_*.py

rewrites the files, and the README's samples (the demo's here; the Lightning and Hugging
Face reports in the integration tests, with ``check_readme``), from what the code prints now. Paths
are written relative to the repository and the version as ``<version>``, so the files
are the same on every machine.
"""

import difflib
import io
import os
import re
import runpy
import sys
from pathlib import Path

import pytest

import modeguard
from modeguard import Severity, _auto as auto, _cli as cli, _pytest_plugin as plugin
from modeguard.observe import modes

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).with_name("golden")
README = ROOT / "README.md"
SCRIPTS = ROOT / "tests" / "scripts"
UPDATE = os.environ.get("MODEGUARD_UPDATE_GOLDEN") == "1"
HOW_TO_UPDATE = "MODEGUARD_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_golden.py tests/test_integrations_*.py"

# The README's sample of `make demo`'s output, between these markers.
README_SAMPLE = re.compile(r"(<!-- demo-report:start -->\n```text\n)(.*?)(```\n<!-- demo-report:end -->)", re.S)


def normalise(text: str) -> str:
    """Paths relative to the repository (or, for an installed modeguard, to the folder it
    is installed in), the version as a placeholder."""
    for folder in {str(ROOT), os.path.dirname(os.path.dirname(os.path.abspath(modeguard.__file__)))}:
        text = text.replace(folder + os.sep, "")
    return text.replace(f"modeguard {modeguard.__version__}", "modeguard <version>")


def check(name: str, text: str) -> None:
    path = GOLDEN / name
    text = normalise(text)
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    assert path.exists(), f"tests/golden/{name} is missing; write it with {HOW_TO_UPDATE}"
    expected = path.read_text(encoding="utf-8")
    if text != expected:
        diff = "".join(difflib.unified_diff(
            expected.splitlines(True), text.splitlines(True), f"tests/golden/{name}", "printed now"))
        pytest.fail(f"the output differs from tests/golden/{name}:\n{diff}\n"
                    f"If the change is intended: {HOW_TO_UPDATE}", pytrace=False)


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    for name in ("MODEGUARD", "FORCE_COLOR", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)
    yield
    assert not auto.active() and not modes.is_patched()


@pytest.fixture(scope="module")
def demo_report():
    """The report of the bundled demo's training loop, as `make demo` makes it."""
    from modeguard import demo

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MODEGUARD", raising=False)
        guard = auto.start(on_violation="record")
        try:
            demo.train()
        finally:
            auto.stop()
    return guard.report()


def test_str_report(demo_report):
    assert [v.code for v in demo_report] == ["MG101", "MG401"]
    check("report.txt", str(demo_report))


def test_readme_demo_sample_is_the_golden_report(demo_report):
    readme = README.read_text(encoding="utf-8")
    m = README_SAMPLE.search(readme)
    assert m, "README lost its demo-report markers"
    if UPDATE:
        text = normalise(str(demo_report))
        README.write_text(readme[:m.start(2)] + text + readme[m.end(2):], encoding="utf-8")
        return
    assert m.group(2) == (GOLDEN / "report.txt").read_text(encoding="utf-8"), (
        f"README's demo sample is not tests/golden/report.txt; rewrite it with {HOW_TO_UPDATE}")


def check_readme(marker: str, name: str) -> None:
    """The README's sample between ``<!-- marker:start -->`` and ``<!-- marker:end -->``
    is the golden file ``name`` (rewritten from it with MODEGUARD_UPDATE_GOLDEN=1)."""
    pattern = re.compile(rf"(<!-- {marker}:start -->\n```text\n)(.*?)(```\n<!-- {marker}:end -->)", re.S)
    readme = README.read_text(encoding="utf-8")
    m = pattern.search(readme)
    assert m, f"README lost its {marker} markers"
    golden = (GOLDEN / name).read_text(encoding="utf-8")
    if UPDATE:
        README.write_text(readme[:m.start(2)] + golden + readme[m.end(2):], encoding="utf-8")
        return
    assert m.group(2) == golden, f"README's {marker} sample is not tests/golden/{name}; rewrite it with {HOW_TO_UPDATE}"


# `modeguard run` as a user types it, from the repository: the script's path is part of
# the headline, and rich wraps that headline by its length.
BUG = os.path.join("tests", "scripts", "validate_bug.py")


def test_run_summary_in_a_pipe(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert cli.main(["run", BUG]) == 3
    check("run_summary.txt", capsys.readouterr().err)


def test_run_summary_quiet(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert cli.main(["run", "--quiet", BUG]) == 3
    check("run_summary_quiet.txt", capsys.readouterr().err)


def test_run_summary_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setattr(sys, "stderr", term)
    assert cli.main(["run", BUG]) == 3
    # Colour codes off, and the spaces rich pads the table's title with.
    text = re.sub(r"\x1b\[[0-9;]*m", "", term.getvalue())
    check("run_summary_terminal.txt", "".join(line.rstrip() + "\n" for line in text.splitlines()))


def test_explain(capsys):
    assert cli.main(["explain", "MG101"]) == 0
    check("explain_MG101.txt", capsys.readouterr().out)


def test_pytest_failure_message(capsys):
    # What a test that runs both scripts under `pytest --modeguard` fails with (the
    # plugin's automatic watching follows every forward).
    guard = auto.start(on_violation="record", backward_sample=1)
    try:
        for script in ("validate_bug.py", "eval_in_train_mode.py"):
            runpy.run_path(str(SCRIPTS / script), run_name="__main__")
    finally:
        auto.stop()
    violations = guard.violations
    assert sorted(v.code for v in violations) == ["MG101", "MG201"]
    check("pytest_failure.txt", plugin._failure_message(violations, violations, Severity.WARNING))
