"""MG201 eval-in-train-mode: evaluating while mode-sensitive modules are in train mode."""

from __future__ import annotations

from .._config import Severity
from .._frames import _is_internal, stack_has_function
from ..observe.graph import ACTIVITY
from ..report.names import leaves
from ._base import NORM_KINDS, Rule

# Consecutive evaluation-like forwards (with no backward or step in between) before this
# fires. A model that is itself trained (a backward or a step reached it), or a program
# that trains nothing, is evaluating after two. A model that never gets a backward while
# others train is a teacher, target network or momentum encoder: MoCo and BYOL run theirs
# two or more times per step under no_grad in train mode on purpose, so only a long run
# counts.
STREAK = 2
STREAK_AUXILIARY = 8
# Such a model is still reported when Dropout is active in it: a distillation teacher
# called under no_grad once per step gives random targets. Counted once per training
# step, it is reported at the third step it was used in. (MoCo/BYOL/DINO encoders keep
# only BatchNorm's batch statistics on purpose, and stay quiet.)
TEACHER_STEPS = 3


def _threshold(root) -> int:
    if root.trained:
        return STREAK
    # The program trains if something trained since this guard was made, or if it was
    # given an optimizer: a teacher's no_grad forwards come before the first backward.
    guard = root.guard
    trains = ACTIVITY[0] != guard.activity_at_start or guard.has_optimizers
    return STREAK_AUXILIARY if trains else STREAK


def _presumed_just_before_unused(root, record, act) -> bool:
    """The forward just before this unused one was presumed backpropagated (it looked
    like training), nothing moved since (no step, no backward seen), and the model's
    gradients did not move either: it was the first batch of the same evaluation."""
    p = root.presumed
    return (
        p.seq == record.seq - 1 and p.activity == act and p.snapshot is not None
        and p.snapshot.root_training and bool(p.snapshot.train_sensitive) and root.grads_unmoved()
    )


class _Streaks:
    """This rule's memory of one model: runs of evaluation-like forwards."""

    __slots__ = ("nograd", "nograd_mark", "nograd_seq", "unused", "unused_mark", "teacher", "teacher_mark")

    def __init__(self):
        self.nograd = self.unused = self.teacher = 0
        self.nograd_mark = self.nograd_seq = self.unused_mark = self.teacher_mark = -1


def _new_streaks(root) -> _Streaks:
    s = root.rule_state["MG201"] = _Streaks()
    return s


class EvalInTrainMode(Rule):
    code = "MG201"
    name = "eval-in-train-mode"
    severity = Severity.WARNING
    summary = "forward passes that evaluate the model (no_grad, or graphs never backpropagated) run with mode-sensitive modules in train mode."
    explanation = """
        In train mode Dropout zeroes random activations, so evaluation results are random,
        and BatchNorm normalises with batch statistics and overwrites its running statistics
        with the evaluation data, which silently changes the model you later save. A forward
        counts as evaluation when it runs under torch.no_grad()/torch.inference_mode(), or
        when several grad-enabled forwards in a row build graphs that no backward ever uses,
        with no backward or optimizer step in between. A model that is never trained,
        used under no_grad once per step while another model trains (a distillation
        teacher), is reported when Dropout is active in it: its targets are random.
    """
    quiet_when = [
        "torch.optim.swa_utils.update_bn (it recomputes BatchNorm statistics in train mode on purpose)",
        "Monte-Carlo dropout: the model is in eval and dropout modules were switched back to train one by one, or the model is in train with every norm layer put back in eval",
        "a single no_grad forward between training steps (GAN fake batches), or a few per step of a model that is not itself trained and has no Dropout active (MoCo/BYOL/DINO momentum encoders, whose train mode is BatchNorm's batch statistics on purpose)",
        "an EMA or Mean Teacher whose Dropout noise is wanted: say so with `with modeguard.allow(\"MG201\")` around its forward",
        "code under `with modeguard.allow(\"MG201\")`",
    ]
    fix = "call model.eval() before evaluating (and model.train() afterwards), and wrap evaluation in torch.no_grad()."

    def why(self, kinds=frozenset()):
        if not kinds:
            return super().why(kinds)
        parts = []
        if "dropout" in kinds:
            parts.append("Dropout zeroes random activations, so evaluation results are random")
        if kinds & NORM_KINDS:
            norm = "BatchNorm" if "batchnorm" in kinds else "InstanceNorm"
            parts.append(f"{norm} normalises with batch statistics and overwrites its running statistics with "
                         f"the evaluation data, which silently changes the model you later save")
        if kinds - NORM_KINDS - {"dropout"}:
            parts.append("modules that read self.training take their training-mode path, so the evaluation "
                         "does not measure the model you will use")
        return "In train mode " + ", and ".join(parts) + "."

    def on_nograd_forward(self, guard, root, snapshot):
        # Called on every no_grad forward: the lookup inline, the constructor only once.
        s = root.rule_state.get("MG201") or _new_streaks(root)
        if not snapshot.root_training or not snapshot.train_sensitive:
            s.nograd = 0
            return
        # A streak is broken by a backward or step (ACTIVITY moves) and by a grad-enabled
        # forward of this model in between (its forward count moves).
        act, seq = ACTIVITY[0], root.fwd_seq
        if act == s.nograd_mark and seq == s.nograd_seq:
            s.nograd += 1
        else:
            s.nograd, s.nograd_mark, s.nograd_seq = 1, act, seq
        if s.nograd >= _threshold(root):
            self._fire(guard, root, snapshot, None, "under torch.no_grad()/inference_mode()", None)
        elif snapshot.train_dropout and not root.trained and act != s.teacher_mark:
            self._count_teacher_step(guard, root, snapshot, s, act)

    def _count_teacher_step(self, guard, root, snapshot, s, act):
        """A model no backward reached, used under no_grad again after another model's
        backward or step, with Dropout active. (Once per step: the streak above, which
        a step breaks, never grows.) ACTIVITY, not this guard's own steps: the teacher
        may have a guard of its own."""
        s.teacher_mark = act
        s.teacher += 1
        if s.teacher < TEACHER_STEPS:
            return
        names = [e.name for e in snapshot.train_dropout]
        self._fire(
            guard, root, snapshot, None, None, None, names=names,
            headline=(f"a model that is not trained runs under torch.no_grad() at every step while another model "
                      f"trains, with {len(names)} Dropout modules in train mode: its outputs (targets, "
                      f"pseudo-labels) are random"),
        )

    def on_release(self, guard, record):
        snap = record.snapshot
        if not snap.root_training or not snap.train_sensitive:
            return
        root = record.root
        s = root.rule_state.get("MG201") or _new_streaks(root)
        act = ACTIVITY[0]
        if act == s.unused_mark:
            s.unused += 1
        else:
            s.unused, s.unused_mark = 1, act
            if _presumed_just_before_unused(root, record, act):
                s.unused += 1  # the evaluation's first forward, taken for training
        if s.unused >= _threshold(root) and record.where is not None:
            self._fire(guard, root, snap, record.where, "with grad enabled, and no backward used their graphs", record.allowed)

    def on_report(self, guard, root):
        """The model's last forward was an ordinary-looking training forward (presumed
        backpropagated), and nothing followed it: no backward reached the model, no step
        ran. A model that has been trained, evaluated with one batch at the end of the
        program in train mode with grad enabled. (A single such forward between training
        steps is a batch whose backward was skipped; only at the end is it evaluation.)"""
        p = root.presumed
        snap = p.snapshot
        if (snap is None or p.seq != root.fwd_seq or p.judged == p.seq or p.activity != ACTIVITY[0]
                or not root.trained or not snap.root_training or not snap.train_sensitive
                or not root.grads_unmoved()):
            return
        p.judged = p.seq
        code = p.code
        where = (code, p.line) if code is not None and not _is_internal(code) else None
        self._fire(guard, root, snap, where, "with grad enabled, its last forward, which no backward used", p.allowed)

    def _fire(self, guard, root, snap, where, how, allowed, names=None, headline=None):
        if stack_has_function({"update_bn"}, "swa_utils"):
            return
        if snap.eval_sensitive and all(e.kind == "dropout" for e in snap.train_sensitive):
            # Monte-Carlo dropout spelled model.train() + norm layers put back in eval:
            # only dropout is left stochastic, deliberately.
            return
        if names is None:
            listed = [e for e in snap.train_sensitive if not e.marked] or list(snap.train_sensitive)
        else:
            listed = [e for e in snap.train_sensitive if e.name in names]
        names = leaves([e.name for e in listed])  # as the report lists them: no containers
        guard.emit(
            self, severity=None, root=root, where=where, modules=names, mode_site=root.root_site(),
            kinds={e.name: e.kind for e in listed},
            headline=headline or f"the model is being evaluated ({how}) while {len(names)} mode-sensitive modules are in train mode",
            allowed=allowed,
        )
