"""The notebook extension, in-process: an IPython shell runs cells as a notebook would.

Displays are captured with IPython's own ``capture_output`` (what a notebook front end
would receive: text/plain and text/html) or, for the terminal case, read from stdout.
"""

from __future__ import annotations

import atexit
import builtins
import sys
import warnings

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from traitlets.config import Config

import modeguard
from modeguard import _auto as auto
from modeguard.observe import modes
from models import MLP

SETUP = """
import torch, torch.nn as nn, torch.nn.functional as F
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.2), nn.Linear(16, 3))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))

def train_steps(n=3):
    for _ in range(n):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
"""

# The validate-and-forget bug: eval mode, then training steps.
BUGGY = """
model.eval()
train_steps()
"""

# The legitimate look-alike: evaluation in eval mode under no_grad, then back to train.
CORRECT = """
model.eval()
with torch.no_grad():
    model(x)
model.train()
train_steps()
"""


@pytest.fixture
def shell(tmp_path):
    """A fresh InteractiveShell; what creating one changes in this process is put back."""
    if InteractiveShell.initialized():
        pytest.fail("another InteractiveShell is alive in this process; tests must not share one")
    saved_main = sys.modules.get("__main__")
    saved_hooks = (sys.displayhook, sys.excepthook)
    saved_builtins = set(vars(builtins))
    cfg = Config()
    cfg.HistoryManager.hist_file = ":memory:"
    sh = InteractiveShell.instance(config=cfg, ipython_dir=str(tmp_path / "ipython"))
    try:
        yield sh
    finally:
        if "modeguard" in sh.extension_manager.loaded:
            sh.extension_manager.unload_extension("modeguard")
        auto.stop()
        atexit.unregister(sh.atexit_operations)
        InteractiveShell.clear_instance()
        sys.modules["__main__"] = saved_main
        sys.displayhook, sys.excepthook = saved_hooks
        for name in set(vars(builtins)) - saved_builtins:
            delattr(builtins, name)


def run(sh, code: str):
    """Run a cell; returns the captured (stdout, displays). Fails on a cell error."""
    with capture_output() as cap:
        result = sh.run_cell(code, store_history=True)
    result.raise_error()
    return cap.stdout, [o.data for o in cap.outputs]


def load(sh):
    stdout, displays = run(sh, "%load_ext modeguard")
    assert "modeguard: watching" in stdout and not displays
    run(sh, SETUP)


def test_load_ext_shows_the_report_under_the_cell_that_fired(shell):
    load(shell)
    assert auto.active() and modes.is_patched()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # recorded and displayed, never warned
        stdout, displays = run(shell, BUGGY)
    assert len(displays) == 1
    shown = displays[0]
    assert "MG101 step-in-eval" in shown["text/html"] and "<pre" in shown["text/html"]
    text = shown["text/plain"]
    assert "MG101 step-in-eval [error]" in text and "fix:" in text
    # Lines are named as the notebook shows them: the step inside train_steps (the SETUP
    # cell, In[2]) and the eval() of the buggy cell (In[3]).
    assert "where:    In[2]:11 in train_steps()" in text
    assert "Sequential.eval() at In[3]:1" in text
    assert "<ipython-input" not in text


def test_a_correct_loop_shows_nothing(shell):
    load(shell)
    stdout, displays = run(shell, CORRECT)
    assert displays == [] and "modeguard" not in stdout
    assert auto.current().violations == []


def test_old_violations_are_not_shown_again(shell):
    load(shell)
    run(shell, BUGGY)
    assert run(shell, "z = 1 + 1") == ("", [])

    # The same bug at the same line (train_steps) again: a one-line note, not the report.
    stdout, displays = run(shell, "train_steps()")
    assert displays == []
    assert "happened again in this cell: MG101 step-in-eval at In[2]:11 (+3)" in stdout

    # A new place with the same bug is new: shown.
    stdout, displays = run(shell, "opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()")
    assert len(displays) == 1 and "MG101" in displays[0]["text/plain"] and "In[6]:1" in displays[0]["text/plain"]


def test_reports_are_text_in_a_terminal(shell, capsys):
    load(shell)
    capsys.readouterr()
    shell.run_cell(BUGGY, store_history=True).raise_error()
    out = capsys.readouterr().out
    assert "MG101 step-in-eval [error]" in out and "fix:" in out
    assert "<modeguard Report" not in out and "<pre" not in out


def test_modes_magic_shows_the_mode_map(shell):
    load(shell)
    run(shell, BUGGY)
    stdout, displays = run(shell, "%modeguard modes model")
    assert len(displays) == 1
    text = displays[0]["text/plain"]
    assert "BatchNorm1d" in text and "sensitive:batchnorm" in text
    assert "eval  <- Sequential.eval() at In[3]:1" in text
    assert "eval" in displays[0]["text/html"]

    # An attribute path on a notebook variable works too.
    stdout, displays = run(shell, "%modeguard modes model.1")
    assert "BatchNorm1d" in displays[0]["text/plain"] and "Linear" not in displays[0]["text/plain"]


def test_modes_magic_errors_name_the_problem(shell):
    load(shell)
    run(shell, "n = 3")
    with pytest.raises(UsageError, match="no variable named 'nope'"):
        shell.run_line_magic("modeguard", "modes nope")
    with pytest.raises(UsageError, match="n is a builtins.int, not a torch.nn.Module"):
        shell.run_line_magic("modeguard", "modes n")
    with pytest.raises(UsageError, match="has no attribute 'encoder'"):
        shell.run_line_magic("modeguard", "modes model.encoder")
    with pytest.raises(UsageError, match="Usage: %modeguard off"):
        shell.run_line_magic("modeguard", "modes")
    with pytest.raises(UsageError, match="cannot understand 'sideways'"):
        shell.run_line_magic("modeguard", "sideways")


def test_mode_map_works_while_paused(shell):
    load(shell)
    run(shell, "%modeguard off")
    shell.user_ns["other"] = MLP().eval()
    stdout, displays = run(shell, "%modeguard modes other")
    assert "BatchNorm1d" in displays[0]["text/plain"]


def test_off_pauses_and_on_resumes(shell):
    load(shell)
    stdout, _ = run(shell, "%modeguard off")
    assert "paused" in stdout
    assert not auto.active() and not modes.is_patched()
    assert run(shell, BUGGY)[1] == []
    assert "already off" in run(shell, "%modeguard off")[0]

    stdout, _ = run(shell, "%modeguard on")
    assert "watching" in stdout and auto.active()
    assert "already watching" in run(shell, "%modeguard on")[0]
    stdout, displays = run(shell, "model.eval(); train_steps()")
    assert len(displays) == 1 and "MG101" in displays[0]["text/plain"]


def test_report_covers_every_cell_and_clear_forgets(shell):
    load(shell)
    run(shell, BUGGY)
    run(shell, "%modeguard off")
    run(shell, "%modeguard on")
    # The second guard (after on) sees the same bug at a new line.
    run(shell, "model.eval()\nfor _ in range(2):\n    opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()")

    stdout, displays = run(shell, "%modeguard report")
    assert len(displays) == 1
    text = displays[0]["text/plain"]
    assert "modeguard report (all cells so far)" in text
    assert "In[2]:11" in text and "In[6]:3" in text
    # What the report showed is not shown again under the next cell.
    assert run(shell, "z = 0") == ("", [])

    stdout, _ = run(shell, "%modeguard")
    assert "watching; 2 distinct violation(s) so far" in stdout

    assert "forgot" in run(shell, "%modeguard clear")[0]
    stdout, displays = run(shell, "%modeguard report")
    assert "no train/eval mode problems found" in displays[0]["text/plain"]
    # After clear, the same bug is news again.
    stdout, displays = run(shell, "train_steps()")
    assert len(displays) == 1 and "MG101" in displays[0]["text/plain"]


def test_unload_removes_everything(shell):
    load(shell)
    callbacks_before = list(shell.events.callbacks["post_run_cell"])
    shell.run_line_magic("unload_ext", "modeguard")
    assert not auto.active()
    assert not modes.is_patched()
    assert len(shell.events.callbacks["post_run_cell"]) == len(callbacks_before) - 1
    assert "modeguard" not in shell.magics_manager.magics["line"]
    assert run(shell, BUGGY) == ("", [])

    # And it loads again cleanly.
    stdout, _ = run(shell, "%load_ext modeguard")
    assert "watching" in stdout and auto.active()
    assert len(run(shell, "model.eval(); train_steps()")[1]) == 1


def test_unload_leaves_a_guard_the_user_made_alone(shell):
    load(shell)
    shell.run_line_magic("unload_ext", "modeguard")
    guard = modeguard.watch(shell.user_ns["model"], shell.user_ns["opt"], on_violation="record")
    try:
        run(shell, "%load_ext modeguard")
        shell.run_line_magic("unload_ext", "modeguard")
        assert guard.active and modes.is_patched()
    finally:
        guard.unwatch()
    assert not modes.is_patched()


def test_a_session_started_before_loading_is_used_and_left_running(shell):
    guard = auto.start(on_violation="record")
    load(shell)
    assert auto.current() is guard
    stdout, displays = run(shell, BUGGY)
    assert len(displays) == 1 and "MG101" in displays[0]["text/plain"]
    shell.run_line_magic("unload_ext", "modeguard")
    assert auto.current() is guard and guard.active


def test_a_bad_setting_is_a_one_line_usage_error_and_loads_nothing(shell, monkeypatch):
    monkeypatch.setenv("MODEGUARD", "banana")
    with capture_output() as cap:
        result = shell.run_cell("%load_ext modeguard", store_history=True)
    assert result.error_in_exec is None or "UsageError" in type(result.error_in_exec).__name__
    text = cap.stdout + cap.stderr
    assert "MODEGUARD='banana': unknown on_violation 'banana'" in text
    assert "Traceback" not in text
    assert not auto.active() and not modes.is_patched()
    assert "modeguard" not in shell.magics_manager.magics["line"]
    monkeypatch.setenv("MODEGUARD", "record")
    load(shell)  # a corrected setting loads as usual
