"""The pytest plugin, run on small generated test suites with ``pytester``.

The inner runs are in-process: they load the plugin through its installed ``pytest11``
entry point like any pytest run (``-p no:modeguard`` blocks it), and reuse the torch this
process has already imported, which a subprocess would spend seconds importing again.
"""

import pytest

pytest_plugins = ["pytester"]

ENV = ("MODEGUARD", "MODEGUARD_PYTEST", "MODEGUARD_FAIL_ON", "MODEGUARD_RULES")

# Small training loops the generated tests import: one clean, and one per severity.
LOOPS = '''
import torch
import torch.nn as nn
import torch.nn.functional as F


def make(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.Linear(8, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def data(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g)


def validate(model, x):
    model.eval()
    with torch.no_grad():
        return model(x).argmax(1)


def train(model, opt, restore=True, epochs=2):
    x, y = data()
    model.train()
    for epoch in range(epochs):
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        validate(model, x)
        if restore:
            model.train()


def eval_with_grad(model):
    """Info only (MG401): evaluation that builds graphs nobody uses."""
    x, _ = data()
    model.eval()
    for _ in range(2):
        model(x).sum().item()


def eval_in_train_mode(model, opt):
    """Warning only (MG201): one training step, then evaluation left in train mode."""
    x, y = data()
    model.train()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    with torch.no_grad():
        for _ in range(3):
            model(x)
'''

AUTO_TESTS = '''
from pg_loops import make, train, eval_with_grad, eval_in_train_mode

def test_clean():
    model, opt = make()
    train(model, opt, restore=True)

def test_validate_bug():
    model, opt = make()
    train(model, opt, restore=False)

def test_no_torch():
    assert 1 + 1 == 2
'''


@pytest.fixture(scope="module", autouse=True)
def warm_torch():
    """In-process runs drop the modules they imported when they end; torch imports parts of
    itself lazily on the first optimizer step and refuses to register them twice. One step
    here, outside the inner runs, keeps them loaded."""
    import torch
    import torch.nn.functional as F

    from modeguard.report import render  # noqa: F401

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    F.mse_loss(model(torch.zeros(1, 2)), torch.zeros(1, 2)).backward()
    opt.step()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No modeguard setting from the caller's environment (conftest.py checks that no run
    leaves automatic watching or a guard behind)."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def suite(pytester):
    pytester.makepyfile(pg_loops=LOOPS)
    return pytester


def _auto_suite(pytester):
    pytester.makepyfile(pg_loops=LOOPS, test_pg_auto=AUTO_TESTS)
    return pytester


# ---- the fixture ----------------------------------------------------------------------

def test_fixture_passes_a_clean_loop_and_fails_the_validate_bug_with_the_report(suite):
    suite.makepyfile(test_pg_fx='''
        from pg_loops import make, train

        def test_clean(modeguard):
            model, opt = make()
            modeguard.watch(model, opt)
            train(model, opt, restore=True)
            assert modeguard.violations == []

        def test_validate_bug(modeguard):
            model, opt = make()
            modeguard.watch(model, opt)
            train(model, opt, restore=False)
    ''')
    result = suite.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*_ test_validate_bug _*",
        "modeguard found 1 train/eval mode problem(s) at or above 'warning' in this test:",
        "*MG101 step-in-eval*error*",
        "*where:*pg_loops.py:*in train()",
        "*mode set: Sequential.eval() at *pg_loops.py:* in validate()",
        "*fix:*model.train()*",
    ])
    # The failure is the report, not a traceback into the plugin.
    assert "_pytest_plugin.py" not in result.stdout.str()
    assert "test_clean" not in "\n".join(l for l in result.outlines if l.startswith("FAILED"))


def test_fixture_follows_every_forward_so_one_skipped_backward_fails_the_test(suite):
    # Tests run a handful of steps: the fixture does not sample, it checks every step.
    suite.makepyfile(test_pg_skip='''
        import torch
        import torch.nn.functional as F
        from pg_loops import make

        def test_skips_one_backward(modeguard):
            model, opt = make()
            modeguard.watch(model, opt)
            for step in range(5):
                opt.zero_grad()
                loss = F.mse_loss(model(torch.randn(4, 4)), torch.zeros(4, 2))
                if step != 3:
                    loss.backward()
                opt.step()
    ''')
    result = suite.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*MG602 step-without-backward*warning*"])


def test_fixture_alone_patches_nothing_outside_its_test(suite):
    suite.makepyfile(test_pg_fx='''
        import torch.nn as nn
        from modeguard import _auto as auto
        from modeguard.observe import modes
        from pg_loops import make

        ORIGINAL_CALL = nn.Module.__call__

        def test_without_fixture():
            assert not modes.is_patched() and not auto.active()
            assert nn.Module.__call__ is ORIGINAL_CALL

        def test_with_fixture(modeguard):
            model, opt = make()
            modeguard.watch(model, opt)
            assert modes.is_patched() and not auto.active()

        def test_after_fixture():
            assert not modes.is_patched() and nn.Module.__call__ is ORIGINAL_CALL
    ''')
    result = suite.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=3)
    assert not [l for l in result.outlines if l.startswith("modeguard")]  # no header when inactive


def test_fixture_fail_on_can_be_changed_inside_the_test(suite):
    suite.makepyfile(test_pg_fx='''
        from pg_loops import make, eval_in_train_mode

        def test_warning_tolerated(modeguard):
            modeguard.fail_on = "error"
            model, opt = make()
            modeguard.watch(model, opt)
            eval_in_train_mode(model, opt)
            assert [v.code for v in modeguard.violations] == ["MG201"]

        def test_warning_fails(modeguard):
            model, opt = make()
            modeguard.watch(model, opt)
            eval_in_train_mode(model, opt)
    ''')
    result = suite.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["FAILED test_pg_fx.py::test_warning_fails - Failed: modeguard found 1*"])


def test_a_test_that_fails_on_its_own_keeps_its_failure_and_shows_the_report_beside_it(suite):
    suite.makepyfile(test_pg_fx='''
        from pg_loops import make, train

        def test_broken(modeguard):
            model, opt = make()
            modeguard.watch(model, opt)
            train(model, opt, restore=False)
            assert 1 == 2, "the test's own assertion"
    ''')
    result = suite.runpytest()
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "the test's own assertion" in out
    assert "modeguard found" not in out
    result.stdout.fnmatch_lines(["*Captured modeguard call*", "*MG101 step-in-eval*"])


def test_violations_after_the_test_body_fail_at_teardown(suite):
    suite.makepyfile(test_pg_fx='''
        import pytest
        from pg_loops import make, train

        @pytest.fixture
        def trains_at_teardown(modeguard):
            model, opt = make()
            modeguard.watch(model, opt)
            yield
            train(model, opt, restore=False)

        def test_body_is_clean(trains_at_teardown):
            pass
    ''')
    result = suite.runpytest()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_body_is_clean*", "modeguard found 1 *", "*MG101 step-in-eval*"])


# ---- --modeguard, ini and environment -----------------------------------------------

def test_modeguard_option_fails_a_buggy_test_and_passes_clean_ones(pytester):
    _auto_suite(pytester)
    result = pytester.runpytest("--modeguard")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines([
        "modeguard: watching every test for train/eval mode bugs (from command line), fail-on warning (from default)",
        "*_ test_validate_bug _*",
        "modeguard found 1 train/eval mode problem(s)*",
        "*MG101 step-in-eval*",
        "FAILED test_pg_auto.py::test_validate_bug - Failed: modeguard found*",
    ])


def test_without_the_option_the_same_suite_passes_untouched(pytester):
    _auto_suite(pytester)
    result = pytester.runpytest()
    result.assert_outcomes(passed=3)
    assert not [l for l in result.outlines if l.startswith("modeguard")]


def test_ini_turns_automatic_watching_on(pytester):
    _auto_suite(pytester)
    pytester.makeini("[pytest]\nmodeguard = true\n")
    result = pytester.runpytest()
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["modeguard: watching every test * (from ini), fail-on warning (from default)"])


def test_environment_turns_automatic_watching_on_and_beats_the_ini(pytester, monkeypatch):
    _auto_suite(pytester)
    monkeypatch.setenv("MODEGUARD_PYTEST", "1")
    result = pytester.runpytest()
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["modeguard: watching every test * (from MODEGUARD_PYTEST)*"])

    pytester.makeini("[pytest]\nmodeguard = true\n")
    monkeypatch.setenv("MODEGUARD_PYTEST", "0")
    result = pytester.runpytest()
    result.assert_outcomes(passed=3)


def test_fail_on_precedence_command_line_then_environment_then_ini(pytester, monkeypatch):
    _auto_suite(pytester)
    # MG101 is an error: only "never" lets the buggy test pass.
    pytester.makeini("[pytest]\nmodeguard = true\nmodeguard_fail_on = never\n")
    result = pytester.runpytest()
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*fail-on never (from ini)*"])

    monkeypatch.setenv("MODEGUARD_FAIL_ON", "error")
    result = pytester.runpytest()
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*fail-on error (from MODEGUARD_FAIL_ON)*"])

    result = pytester.runpytest("--modeguard-fail-on", "never")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*fail-on never (from command line)*"])


@pytest.mark.parametrize(
    "level, outcomes",
    [
        ("info", dict(failed=3)),
        ("warning", dict(passed=1, failed=2)),
        ("error", dict(passed=2, failed=1)),
        ("never", dict(passed=3)),
    ],
)
def test_fail_on_levels(suite, level, outcomes):
    suite.makepyfile(test_pg_levels='''
        from pg_loops import make, train, eval_with_grad, eval_in_train_mode

        def test_info_only():
            model, _ = make()
            eval_with_grad(model)

        def test_warning_only():
            model, opt = make()
            eval_in_train_mode(model, opt)

        def test_error():
            model, opt = make()
            train(model, opt, restore=False)
    ''')
    result = suite.runpytest("--modeguard", "--modeguard-fail-on", level, "-p", "no:randomly")
    result.assert_outcomes(**outcomes)
    out = result.stdout.str()
    failed = {l.split("::")[1].split(" ")[0] for l in result.outlines if l.startswith("FAILED")}
    expected = {"info": {"test_info_only", "test_warning_only", "test_error"},
                "warning": {"test_warning_only", "test_error"},
                "error": {"test_error"}, "never": set()}[level]
    assert failed == expected
    if level != "info":
        # Findings that did not fail a test are still listed at the end.
        assert "modeguard: findings below the fail-on level" in out
        assert "test_pg_levels.py::test_info_only: MG401 eval-graph-unused [info]" in out


def test_info_findings_never_fail_by_default(suite):
    suite.makepyfile(test_pg_info='''
        from pg_loops import make, eval_with_grad

        def test_info_only():
            model, _ = make()
            eval_with_grad(model)

        def test_info_with_fixture(modeguard):
            model, _ = make()
            modeguard.watch(model)
            eval_with_grad(model)
            assert [v.code for v in modeguard.violations] == ["MG401"]
    ''')
    result = suite.runpytest("--modeguard")
    result.assert_outcomes(passed=2)
    assert result.stdout.str().count("MG401 eval-graph-unused [info]") == 2


def test_rules_option_changes_severities(pytester):
    _auto_suite(pytester)
    result = pytester.runpytest("--modeguard", "--modeguard-rules", "MG101=off")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*rules MG101=off*"])


def test_fixture_and_automatic_watching_together_report_once(suite):
    suite.makepyfile(test_pg_both='''
        from pg_loops import make, train

        def test_watched_twice(modeguard):
            model, opt = make()
            modeguard.watch(model, opt)
            train(model, opt, restore=False)

        def test_called_before_watch(modeguard):
            model, opt = make()
            model(__import__("pg_loops").data()[0])
            modeguard.watch(model, opt)
            train(model, opt, restore=False)
    ''')
    result = suite.runpytest("--modeguard")
    result.assert_outcomes(failed=2)
    # Count in the failure sections only: under CI=true pytest repeats each failure's full
    # message in the short test summary.
    failures = result.stdout.str().split("short test summary info")[0]
    assert failures.count("MG101 step-in-eval [error]") == 2  # one per test


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--modeguard-fail-on", "sometimes"], {}, "*invalid choice: 'sometimes'*"),
        (["--modeguard"], {"MODEGUARD_FAIL_ON": "sometimes"}, "*MODEGUARD_FAIL_ON='sometimes': unknown level 'sometimes'*"),
        ([], {"MODEGUARD_PYTEST": "maybe"}, "*MODEGUARD_PYTEST='maybe': expected 1 or 0*"),
        (["--modeguard-rules", "MG999=off"], {}, "*--modeguard-rules: unknown rule 'MG999'*"),
        ([], {"MODEGUARD": "banana"}, "*MODEGUARD='banana': unknown on_violation 'banana'*"),
        ([], {"MODEGUARD_RULES": "MG101=loud"}, "*MODEGUARD_RULES='MG101=loud': unknown severity 'loud'*"),
        ([], {"MODEGUARD_BACKWARD_SAMPLE": "0"}, "*MODEGUARD_BACKWARD_SAMPLE='0': expected a positive integer*"),
    ],
)
def test_bad_settings_are_usage_errors(pytester, monkeypatch, args, env, message):
    _auto_suite(pytester)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


# ---- markers --------------------------------------------------------------------------

def test_modeguard_marker_watches_one_test_without_the_option(suite):
    suite.makepyfile(test_pg_marks='''
        import pytest
        from pg_loops import make, train, eval_in_train_mode

        @pytest.mark.modeguard
        def test_marked():
            model, opt = make()
            train(model, opt, restore=False)

        def test_unmarked():
            model, opt = make()
            train(model, opt, restore=False)

        @pytest.mark.modeguard(rules={"MG101": "off"})
        def test_rule_off():
            model, opt = make()
            train(model, opt, restore=False)

        @pytest.mark.modeguard(fail_on="error")
        def test_warning_tolerated():
            model, opt = make()
            eval_in_train_mode(model, opt)

        @pytest.mark.modeguard(rules="MG201=error")
        def test_warning_raised_to_error():
            model, opt = make()
            eval_in_train_mode(model, opt)
    ''')
    result = suite.runpytest("--strict-markers", "-p", "no:randomly")
    result.assert_outcomes(passed=3, failed=2)
    failed = sorted(l.split("::")[1].split(" ")[0] for l in result.outlines if l.startswith("FAILED"))
    assert failed == ["test_marked", "test_warning_raised_to_error"]
    result.stdout.fnmatch_lines(["*MG201 eval-in-train-mode*error*"])


def test_no_modeguard_marker_turns_watching_off_for_one_test(suite):
    suite.makepyfile(test_pg_marks='''
        import pytest
        from modeguard.observe import modes
        from pg_loops import make, train

        @pytest.mark.no_modeguard
        def test_opted_out():
            assert not modes.is_patched()
            model, opt = make()
            train(model, opt, restore=False)

        def test_watched():
            model, opt = make()
            train(model, opt, restore=False)
    ''')
    result = suite.runpytest("--modeguard", "--strict-markers")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["FAILED test_pg_marks.py::test_watched*"])


def test_closest_marker_wins(suite):
    suite.makepyfile(test_pg_marks='''
        import pytest
        from pg_loops import make, train

        pytestmark = pytest.mark.modeguard

        @pytest.mark.no_modeguard
        def test_opted_out():
            model, opt = make()
            train(model, opt, restore=False)

        def test_module_marker():
            model, opt = make()
            train(model, opt, restore=False)
    ''')
    result = suite.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["FAILED test_pg_marks.py::test_module_marker*"])


def test_markers_are_registered_with_a_description(pytester):
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines([
        "@pytest.mark.modeguard(rules=None, fail_on=None, frozen=None): watch this test automatically*",
        "@pytest.mark.no_modeguard: no automatic modeguard watching for this test.",
    ])


def test_bad_marker_arguments_fail_that_test_with_a_clear_message(suite):
    suite.makepyfile(test_pg_marks='''
        import pytest

        @pytest.mark.modeguard(fail_on="sometimes")
        def test_bad_level():
            pass

        @pytest.mark.modeguard(rule={"MG101": "off"})
        def test_typo():
            pass
    ''')
    result = suite.runpytest()
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines([
        "*@pytest.mark.modeguard: fail_on: unknown level 'sometimes'*",
        "*@pytest.mark.modeguard takes only rules=, fail_on= and frozen= (got rule)*",
    ])


# ---- switching the plugin off ---------------------------------------------------------

def test_p_no_modeguard_removes_the_plugin(pytester):
    _auto_suite(pytester)
    result = pytester.runpytest("-p", "no:modeguard")
    result.assert_outcomes(passed=3)  # the buggy loop is not watched
    result = pytester.runpytest("-p", "no:modeguard", "--modeguard")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unrecognized arguments: --modeguard*"])

    pytester.makepyfile(test_pg_fx="def test_uses_fixture(modeguard):\n    pass\n")
    result = pytester.runpytest("-p", "no:modeguard", "test_pg_fx.py")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'modeguard' not found*"])


def test_a_graph_alive_at_the_end_of_a_test_counts_as_unused(pytester):
    pytester.makepyfile(test_alive='''
        import torch, torch.nn as nn

        def test_generation(modeguard):
            cell = nn.GRUCell(4, 4).eval()
            modeguard.fail_on = "info"
            modeguard.watch(cell)
            h = torch.zeros(1, 4)
            for _ in range(3):
                h = cell(torch.randn(1, 4), h)   # one growing graph, alive until the end
    ''')
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*MG401 eval-graph-unused*"])
