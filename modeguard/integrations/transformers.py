"""Hugging Face transformers: ``Trainer(..., callbacks=[ModeGuardCallback()])``.

At ``on_train_begin`` the Trainer's model and optimizer are watched (its
``AcceleratedOptimizer`` is unwrapped to the torch optimizer inside); at ``on_train_end``
the report's summary line goes to transformers' logger and the report is printed on the
main process.

The Trainer's own mode handling is understood: ``evaluate()``'s ``model.eval()`` and the
``model.train()`` that ``training_step`` calls at every step are not reported, and where
that ``model.train()`` undoes what the user did (a BatchNorm backbone put in eval before
``trainer.train()``, transformers#24479) the finding (MG301) says that the Trainer set
the mode (``Net.train() by Trainer.training_step (transformers)``).
"""

from __future__ import annotations

from transformers import TrainerCallback

from ._session import CallbackSession


class ModeGuardCallback(TrainerCallback):
    """Watches the Trainer's model and optimizer for train/eval mode mistakes during
    ``trainer.train()``.

    Options are ``modeguard.watch()``'s (``on_violation`` defaults to ``"record"``: the
    report comes at the end), plus ``fail_on``: the lowest severity (``"error"``,
    ``"warning"``, ``"info"``, ``"never"``) that stops training at once with the rule's
    ``ModeGuardError``, before the bad update is applied; default ``MODEGUARD_FAIL_ON``,
    else ``"error"``. ``print_report=False`` leaves printing to you (``callback.report``).
    """

    def __init__(self, on_violation: str = "record", rules=None, frozen=None, backward_sample=None,
                 fail_on=None, print_report: bool = True):
        self.session = CallbackSession("Hugging Face Trainer", on_violation, rules, frozen, backward_sample,
                                       fail_on, print_report)
        # Under the library's logger, so transformers.logging.set_verbosity_*() governs it.
        self.session.logger_name = "transformers.modeguard"

    @property
    def guard(self):
        """The guard of the training in progress (None outside train())."""
        return self.session.guard

    @property
    def report(self):
        """The report of the last training, once it ended."""
        return self.session.report

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is not None:
            self.session.start(model, [optimizer])

    def on_train_end(self, args, state, control, **kwargs):
        self.session.finish(raise_on_fail=True, show=getattr(state, "is_world_process_zero", True))


__all__ = ["ModeGuardCallback"]
