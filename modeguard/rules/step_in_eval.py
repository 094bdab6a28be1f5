"""MG101 step-in-eval: training on gradients from an eval-mode forward."""

from __future__ import annotations

from .._config import Severity
from ..observe.graph import PresumedForward
from ..observe.inputs import UNSEEN, in_frozen_part
from ..report.names import leaves
from ._base import NORM_KINDS, Rule


class StepInEval(Rule):
    code = "MG101"
    name = "step-in-eval"
    severity = Severity.ERROR
    summary = "optimizer.step() applies gradients from a forward that ran with mode-sensitive modules in eval mode."
    explanation = """
        Dropout was switched off and BatchNorm normalised with its frozen running statistics
        while the model was being trained, so the network you optimise is not the one you
        designed, and BatchNorm's running statistics stop tracking the weights. The usual
        cause is a validate() inside the training loop that calls model.eval() with nothing
        calling model.train() afterwards. Severity is error when the whole model (or every
        sensitive module) was in eval, warning when only some modules were.
    """
    quiet_when = [
        "the modules in eval are frozen on purpose: their own parameters all have requires_grad=False",
        "a parameter-free module (Dropout) in eval inside a frozen feature extractor: its input does not require grad, and it comes after frozen layers or sits in a submodule whose parameters are all frozen (an input-layer Dropout fed the model's own inputs is not frozen)",
        "the modules are marked with modeguard.frozen(...) or watch(..., frozen=[...])",
        "the model's own train() override put them in eval (mmdetection's norm_eval pattern)",
    ]
    fix = "call model.train() before the training step (e.g. at the top of each epoch, after validate())."

    def why(self, kinds=frozenset()):
        if not kinds:
            return super().why(kinds)
        norm = "BatchNorm" if "batchnorm" in kinds or not kinds & {"instancenorm"} else "InstanceNorm"
        parts = []
        if "dropout" in kinds:
            parts.append("Dropout was switched off")
        if kinds & NORM_KINDS:
            parts.append(f"{norm} normalised with its frozen running statistics")
        if kinds - NORM_KINDS - {"dropout"}:
            parts.append("modules that read self.training ran their eval-mode code")
        text = (", ".join(parts[:-1]) + " and " + parts[-1]) if len(parts) > 1 else parts[0]
        text += " while the model was being trained, so the network you optimise is not the one you designed"
        if kinds & NORM_KINDS:
            text += f", and {norm}'s running statistics stop tracking the weights"
        return text + "."

    def step_quiet(self, snapshot):
        return snapshot.plain_train

    def on_step(self, guard, opt_state, fresh, roots, backward_seen):
        for st in fresh:
            rec = st.source
            if rec is None or rec.snapshot.plain_train:
                continue  # the common case: O(1)
            self._diagnose(guard, st, rec)

    @staticmethod
    def _trained_through(model, entry, probe, i) -> bool:
        """A parameter-free module in eval (``observe/inputs.py``): gradients flowed
        through it, or it was fed the model's own inputs and is not part of a frozen
        submodule. Quiet when it never ran with grad enabled, or sat behind frozen layers.
        A forward that could not be looked into (compiled, or submodules called outside
        the model's forward): then only the frozen-part test."""
        if model is None:
            return False
        if probe is UNSEEN:
            return not in_frozen_part(model, entry.name)
        reading = probe.get(i) if probe else None
        if not reading:
            return False
        needs_grad, fed = reading
        return needs_grad or (fed and not in_frozen_part(model, entry.name))

    def _diagnose(self, guard, st, rec):
        snap = rec.snapshot
        snap.refresh_frozen()
        model = st.ref()
        offending = []
        for i, e in enumerate(snap.entries):
            if e.training or e.marked or e.own_frozen is True:
                continue
            if e.site is not None and e.site.how == "override":
                continue
            if e.param_free and not self._trained_through(model, e, rec.probe, i):
                continue
            offending.append(e)
        if not offending:
            return
        candidates = [
            e for e in snap.entries
            if not e.marked and e.own_frozen is not True and not (e.site and e.site.how == "override")
        ]
        # Every sensitive module not frozen on purpose in eval: the whole model, as far as
        # it is trained (one that never ran, a Dropout whose p an attention reads, counts).
        whole = not snap.root_training or not any(e.training for e in candidates)
        severity = Severity.ERROR if whole else Severity.WARNING
        root_site = st.root_site()
        named = _named(snap, offending)
        # Counted as the report lists them: the modules that change behaviour, no containers.
        scope = ("the model" if not snap.root_training else
                 f"{len(leaves(list(named)))} of {len(leaves([e.name for e in snap.entries]))} mode-sensitive modules")
        headline = f"optimizer.step() applied gradients from a forward in which {scope} ran in eval mode"
        guard.emit(
            self, severity=severity, root=st, where=None, modules=list(named), kinds=named,
            mode_site=root_site if not snap.root_training and root_site else offending[0].site,
            headline=headline, allowed=rec.allowed, forward_at=_called_at(rec),
        )


def _called_at(rec):
    """The line that called the forward behind this step: recorded for a followed
    forward (``ForwardRecord.called_at``) and for a presumed one (its code and line)."""
    if isinstance(rec, PresumedForward):
        return (rec.code, rec.line) if rec.code is not None else None
    return getattr(rec, "called_at", None)


def _named(snap, offending) -> dict:
    """name -> kind of the modules a finding lists. A module that reads self.training
    for its dropout (Hugging Face attention: ``dropout_p=self.dropout.p if self.training
    else 0.0``) is named by its Dropout children in eval, which never run themselves:
    the dropout is what was switched off."""
    out: dict = {}
    for e in offending:
        if e.kind == "custom":
            below = [c for c in snap.entries
                     if c.kind == "dropout" and not c.training and not c.marked and c.name.startswith(e.name + ".")]
            if below:
                out.update((c.name, c.kind) for c in below)
                continue
        out[e.name] = e.kind
    return out
