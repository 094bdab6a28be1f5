"""MG301 frozen-bn-drift: a frozen BatchNorm left in train mode."""

from __future__ import annotations

from .._config import Severity
from ._base import Rule

#: requires_grad flips have no hook: a watched model's BatchNorm modules in train mode
#: have it re-read every this many steps (or the number of such modules, if larger, so
#: the amortised cost per step stays constant).
REFRESH_EVERY = 64


class FrozenBNDrift(Rule):
    code = "MG301"
    name = "frozen-bn-drift"
    severity = Severity.WARNING
    summary = "a BatchNorm whose affine parameters are frozen (requires_grad=False) is in train mode during training."
    explanation = """
        Freezing a BatchNorm's weight and bias does not freeze it: in train mode it still
        normalises with batch statistics and overwrites running_mean/running_var every step,
        so the "frozen" backbone drifts away from the statistics it was trained with, which
        hurts most with small fine-tuning batches. Put frozen BatchNorm in eval mode.
    """
    quiet_when = [
        "track_running_stats=False (nothing to drift)",
        "the BatchNorm is in eval mode",
        "its weight or bias is still trainable",
    ]
    fix = "after model.train(), call .eval() on the frozen part (or override train() to keep it in eval)."

    @property
    def poll_interval(self):
        return REFRESH_EVERY

    def step_quiet(self, snapshot):
        # requires_grad flips have no hook: on_poll re-reads them and asks again.
        return not snapshot.frozen_bn_in_train

    def on_poll(self, guard, root, snapshot):
        """Re-read requires_grad of the BatchNorm modules in train mode (all that this
        rule needs), at most once per len(train_bn) steps."""
        if snapshot.train_bn:
            snapshot.refresh_frozen(snapshot.train_bn)
            snapshot.step_quiet = guard.step_quiet(snapshot)
        return max(REFRESH_EVERY, len(snapshot.train_bn))

    def on_step(self, guard, opt_state, fresh, roots, backward_seen):
        for st in fresh:
            rec = st.source
            if rec is None:
                continue
            snap = rec.snapshot
            if not snap.frozen_bn_in_train:
                continue
            names = [e.name for e in snap.frozen_bn_in_train]
            guard.emit(
                self, severity=None, root=st, where=None, modules=names,
                mode_site=snap.frozen_bn_in_train[0].site or st.root_site(),
                headline=f"{len(names)} BatchNorm module(s) with frozen parameters are in train mode, so their running statistics keep changing",
                allowed=rec.allowed,
            )
