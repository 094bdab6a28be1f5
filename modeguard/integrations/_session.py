"""What the framework callbacks share: the settings, watching a model and its optimizers
when training starts, and the report when it ends (or when ``fail_on`` stops it).

A callback never changes what the framework does: it watches, as ``modeguard.watch()``
does, and reports. The framework-specific parts (where the model and optimizers come
from, which logger hears the summary) live in ``lightning.py`` and ``transformers.py``.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Optional

from .._config import FailOn, resolve
from .. import _auto
from .._guard import Guard, settings_config, watch
from ..report import Report
from ..report.render import print_report


class CallbackSession:
    """One callback's guard across the trainings it sees (a new guard for each)."""

    def __init__(self, framework: str, on_violation: str = "record", rules=None, frozen=None,
                 backward_sample: Optional[int] = None, fail_on=None, print_report: bool = True):
        # Checked now, so that a bad option fails where the callback is made, not at fit().
        settings_config(on_violation, rules, frozen, backward_sample)
        # fail_on=, then MODEGUARD_FAIL_ON, then "error" (as for modeguard run).
        self.fail_on: FailOn = resolve({"fail_on": fail_on}, defaults={"fail_on": "error"}, settings=("fail_on",)).fail_on
        self.framework = framework
        self.options = dict(on_violation=on_violation, rules=rules, frozen=frozen, backward_sample=backward_sample)
        self.print_report = print_report
        self.guard: Optional[Guard] = None
        self.report: Optional[Report] = None  # the last training's, once it ended
        self._created = False
        self._model_name = ""
        self._stopped = False

    def start(self, model, optimizers: Iterable, step_fn=None) -> Optional[Guard]:
        """Watch ``model`` and ``optimizers`` (wrappers welcome) for this training.
        ``step_fn``: the user's function that runs the forward (a LightningModule's
        ``training_step``), named by findings about steps whose model forward never ran
        because that function called submodules."""
        self.finish(raise_on_fail=False)  # a training that ended without telling us
        self.report, self._stopped = None, False
        opts = [o for o in optimizers if o is not None]
        automatic = _auto.current()
        if automatic is not None:
            # Under modeguard run (or pytest --modeguard) the automatic guard watches the
            # model as it is called; a second guard would take it away from the summary.
            for o in opts:
                automatic.watch_optimizer(o, hooks=False, check_params=False)
            guard, self._created = automatic, False
        else:
            guard = watch(model, *opts, **self.options)
            self._created = guard._created_by_last_call
        self.guard = guard
        st = guard.root_state(model)
        self._model_name = st.name if st is not None else type(model).__name__
        code = getattr(step_fn, "__code__", None)
        if st is not None and code is not None:
            st.called_from = (code, code.co_firstlineno)
        if guard.active:
            guard.fail_on, guard.on_fail = self.fail_on, self._on_fail
        return guard

    def _on_fail(self, violation) -> None:
        """A finding at or above fail_on, about to stop training: report and let go first,
        since the exception may leave the framework without calling us again."""
        self._stopped = True
        self.finish(raise_on_fail=False)

    def finish(self, raise_on_fail: bool = True, log: Optional[Callable[[Report, str], None]] = None,
               show: bool = True) -> Optional[Report]:
        """End watching, log and print the report; idempotent. With ``raise_on_fail``, a
        report at or above fail_on that did not stop training already raises now."""
        guard, self.guard = self.guard, None
        if guard is None:
            return self.report
        report = guard.report()
        if self._created:
            guard.unwatch()
        else:  # watched before us (modeguard run): the owner ends it
            guard.fail_on = guard.on_fail = None
        self.report = report
        summary = self.summary(report)
        (log or self.log)(report, summary)
        if self.print_report and show:
            print_report(report)
        worst = report.worst()
        if raise_on_fail and not self._stopped and worst is not None and self.fail_on.fails(worst):
            self._stopped = True
            from .._exceptions import ModeGuardError

            raise ModeGuardError(f"{summary}: at or above fail_on={self.fail_on.value!r}, see the report above",
                                 report.violations[0])
        return report

    def summary(self, report: Report) -> str:
        counts = report.counts()
        found = (f"{counts['error']} error, {counts['warning']} warning, {counts['info']} info"
                 if report.violations else "no train/eval mode problems")
        return f"modeguard: {found} in {self.framework} training of {self._model_name}"

    def log(self, report: Report, summary: str) -> None:
        """The summary line through the framework's Python logger (set by each callback)."""
        logger = logging.getLogger(self.logger_name)
        logger.log(logging.WARNING if report.violations else logging.INFO, summary)

    logger_name = "modeguard"


def counts_as_metrics(report: Report) -> dict:
    """``{"modeguard/error": 1, ...}``: what a metrics logger is given."""
    return {f"modeguard/{level}": n for level, n in report.counts().items()}

