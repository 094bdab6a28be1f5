"""MG202 dropout-ignores-eval: dropout that keeps dropping while the model is in eval mode."""

from __future__ import annotations

import sys

import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .._config import Severity
from .._frames import call_shape, is_internal_frame, user_frame_from
from .._markers import ALLOWED
from ._base import Rule

_DROPOUTS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)
_SDPA = F.scaled_dot_product_attention
#: The position of ``training`` in the dropout functions' signatures: (input, p, training).
_TRAINING_POSITION = 2
_SDPA_DROPOUT_POSITION = 4  # (query, key, value, attn_mask, dropout_p, ...)


def _dropout_p(func, args, kwargs):
    """The drop probability this call uses, 0.0 where it drops nothing."""
    if func is _SDPA:
        p = kwargs.get("dropout_p", args[_SDPA_DROPOUT_POSITION] if len(args) > _SDPA_DROPOUT_POSITION else 0.0)
        return p if isinstance(p, (int, float)) else 0.0
    # torch's own dispatch hands the dropout functions' arguments over by keyword.
    training = kwargs.get("training", args[_TRAINING_POSITION] if len(args) > _TRAINING_POSITION else None)
    if training is not True:
        return 0.0
    p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
    return p if isinstance(p, (int, float)) else 0.0


def _caller(func):
    """The frame that called ``func``. The dropout functions run torch's dispatch from
    inside themselves, so their caller is above their own frame; a builtin such as
    scaled_dot_product_attention calls into the mode directly. Another torch function
    mode above ours (the user's, pushed inside the forward) hands the call on from its
    own ``__torch_function__``: the call was made above that."""
    code = getattr(func, "__code__", None)
    f = sys._getframe(3)  # above on_eval_call and the mode's __torch_function__
    while f is not None:
        if code is not None:
            g = f
            while g is not None and g.f_code is not code:
                g = g.f_back
            if g is None:
                return f
            f = g.f_back
        if f is not None and f.f_code.co_name == "__torch_function__" and isinstance(f.f_locals.get("self"), TorchFunctionMode):
            f = f.f_back
            continue
        return f
    return None


class DropoutIgnoresEval(Rule):
    code = "MG202"
    name = "dropout-ignores-eval"
    severity = Severity.WARNING
    summary = "dropout keeps dropping during an eval-mode forward: F.dropout with training left at its default, scaled_dot_product_attention with an unconditional dropout_p, or a Dropout module built inside forward."
    explanation = """
        Dropout that is still on while the model is evaluated makes every evaluation
        random: metrics are noisy, and two runs over the same data disagree. model.eval()
        reaches only the Dropout modules registered in the model and the calls that pass
        training=self.training; F.dropout(x, p) with training left at its default True,
        F.scaled_dot_product_attention(..., dropout_p=self.p) passed whatever the mode, and
        an nn.Dropout(p) built inside forward (never a submodule, so always in train mode)
        keep dropping. modeguard looks at the torch calls of the first eval-mode forward of
        each watched model after each mode change, never at a training step, so a call made
        only in some eval forwards can go unseen.
    """
    quiet_when = [
        "the call follows the mode: `F.dropout(x, p, training=self.training)`, `dropout_p=self.p if self.training else 0.0`",
        "Monte-Carlo dropout on purpose: Dropout modules (or the module making the call) switched back to train, or `training=True` written at the call site",
        "a Dropout module that is a registered submodule (model.eval() switches it off)",
        "the model is in train mode",
        "code under `with modeguard.allow(\"MG202\")`",
    ]
    fix = "pass training=self.training to F.dropout, dropout_p=self.p if self.training else 0.0 to scaled_dot_product_attention, and build Dropout modules in __init__."

    eval_calls = _DROPOUTS + (_SDPA,)

    def on_eval_call(self, guard, root, watch, func, args, kwargs):
        # O(1) until a call that really drops is seen: most sampled forwards have none.
        p = _dropout_p(func, args, kwargs)
        if not p > 0:
            return
        allowed = ALLOWED.get()
        if allowed and self.code in allowed:
            return
        try:
            found = self._diagnose(watch, func, p)
        except Exception:  # reading frames and source must never break the user's forward
            found = None
        if found is None:
            return
        where, modules, headline = found
        guard.emit(self, severity=None, root=root, where=where, modules=modules, mode_site=root.root_site(),
                   headline=headline, allowed=None)

    def _diagnose(self, watch, func, p):
        """Slow path: (where, modules, headline) if this dropping call is a bug, else None."""
        caller = _caller(func)
        if caller is None:
            return None
        frame, owner = watch.model_frame(caller)
        if frame is None:
            watch.live = False  # the model is not on the stack: a mode left behind
            return None
        if owner.training:
            # The model's own module that runs this call is in train mode inside an
            # eval-mode model: switched back to train on purpose (Monte-Carlo dropout; a
            # registered Dropout module in train is this case too).
            return None
        user_written = not is_internal_frame(caller)
        name = getattr(func, "__name__", "dropout")
        if user_written and func is not _SDPA:
            shape = call_shape(caller, name)
            if shape is None or shape.unpacks or "training" in shape.keywords or shape.positional > _TRAINING_POSITION:
                # training=True written at the call site: Monte-Carlo dropout on purpose.
                # (A call whose source cannot be read is given the benefit of the doubt.)
                return None
        module = None if user_written else caller.f_locals.get("self")
        if func is _SDPA:
            headline = f"scaled_dot_product_attention() ran with dropout_p={p:g} in an eval-mode forward"
        elif isinstance(module, nn.Module):
            headline = (f"{type(module).__name__}(p={p:g}) ran in train mode in an eval-mode forward: it is not a "
                        f"submodule of the model (built inside forward?), so eval() never reached it")
        elif user_written:
            headline = f"F.{name}() ran with training left at its default True (p={p:g}) in an eval-mode forward"
        else:
            headline = f"F.{name}() ran with training=True (p={p:g}) in an eval-mode forward"
        where = user_frame_from(caller)
        modules = [] if owner is watch.st.ref() else [_module_name(watch, owner)]
        return (where.f_code, where.f_lineno) if where is not None else None, modules, headline


def _module_name(watch, module) -> str:
    """Slow path, on firing: the module's name in the model."""
    model = watch.st.ref()
    if model is not None:
        for name, m in model.named_modules():
            if m is module:
                return name
    return type(module).__name__
