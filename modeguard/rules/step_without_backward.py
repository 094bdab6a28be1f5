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
        backward() was skipped by a branch (a non-finite loss), or step() is called
        twice. Every occurrence is caught: at each step modeguard reads whether the
        gradients of two of the model's parameters moved since the previous step.
    """
    quiet_when = [
        "gradient accumulation (several backwards, then one step)",
        "optimizer.step(closure) whose closure runs the backward (LBFGS, PyTorch Lightning)",
        "the optimizer holds no parameters of a watched model (modeguard cannot see its gradients)",
    ]
    fix = "call loss.backward() before every optimizer.step() (or skip the step on that branch too)."

    def step_quiet(self, snapshot):
        return True  # it speaks only about steps with no new gradients at all

    def on_step(self, guard, opt_state, fresh, roots, backward_seen):
        if fresh or backward_seen or not roots:
            return
        guard.emit(
            self, severity=None, root=roots[0], where=None, modules=[], mode_site=None,
            headline="optimizer.step() ran, but no backward reached its parameters since its previous step",
            allowed=None,
        )
