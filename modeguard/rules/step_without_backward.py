"""MG602 step-without-backward: a step with no fresh gradients."""

from __future__ import annotations

from .._config import Severity
from ._base import Rule


class StepWithoutBackward(Rule):
    code = "MG602"
    name = "step-without-backward"
    severity = Severity.WARNING
    summary = "optimizer.step() ran with no backward into its parameters since its previous step."
    explanation = """
        The step applies whatever gradients are left in .grad: if zero_grad() was not
        called they are the previous batch's, applied a second time; if it was, the step
        does nothing but still advances momentum and learning-rate schedules. Usually a
        backward() was skipped by a branch, or step() is called twice. A second step()
        with no forward in between is always caught; a backward skipped right after an
        ordinary training forward is caught on the forwards modeguard samples (about one
        in 16; watch(..., backward_sample=1) checks every one).
    """
    quiet_when = [
        "gradient accumulation (several backwards, then one step)",
        "optimizer.step(closure) (LBFGS-style: the closure does the backward)",
        "the optimizer holds no parameters of a watched model (modeguard cannot see its gradients)",
    ]
    fix = "call loss.backward() before every optimizer.step() (or skip the step on that branch too)."

    def step_quiet(self, snapshot):
        return True  # it speaks only about steps with no new gradients at all

    def on_step(self, guard, opt_state, fresh, roots, has_closure):
        if fresh or has_closure or not roots:
            return
        guard.emit(
            self, severity=None, root=roots[0], where=None, modules=[], mode_site=None,
            headline="optimizer.step() ran, but no backward reached its parameters since its previous step",
            allowed=None,
        )
