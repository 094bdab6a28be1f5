"""pytest plugin (entry point ``modeguard``; disable with ``-p no:modeguard``).

The ``modeguard`` fixture hands a test a watcher; at teardown the test fails if any
violation at or above the configured level occurred, with the report as the message.
"""

from __future__ import annotations

import pytest

from ._config import Severity


class ModeGuardFixture:
    """What the ``modeguard`` fixture yields: ``modeguard.watch(model, opt)`` inside a test."""

    def __init__(self, fail_on: Severity = Severity.WARNING):
        self.fail_on = fail_on
        self.guards = []

    def watch(self, model, *optimizers, **kwargs):
        from .guard import watch

        kwargs.setdefault("on_violation", "record")
        guard = watch(model, *optimizers, **kwargs)
        if guard not in self.guards:
            self.guards.append(guard)
        return guard

    @property
    def violations(self):
        return [v for g in self.guards for v in g.violations]

    def failures(self):
        return [v for v in self.violations if v.severity >= self.fail_on]

    def close(self):
        for g in self.guards:
            g.unwatch()


@pytest.fixture
def modeguard():
    fx = ModeGuardFixture()
    try:
        yield fx
        bad = fx.failures()
        if bad:
            from .report import Report

            pytest.fail(f"modeguard found {len(bad)} train/eval mode problem(s):\n{Report(bad)}", pytrace=False)
    finally:
        fx.close()
