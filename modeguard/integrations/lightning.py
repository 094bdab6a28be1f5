"""PyTorch Lightning: ``Trainer(callbacks=[ModeGuardCallback()])``.

At ``on_fit_start`` (the optimizers exist by then) the LightningModule and every optimizer
of the trainer are watched, as ``modeguard.watch(pl_module, *trainer.optimizers)`` would;
at the end of fit (or when it fails) the report goes to the trainer's loggers (counts as
``modeguard/error``, ``modeguard/warning``, ``modeguard/info``), its summary line to
Lightning's Python logger, and the report itself is printed on the global-zero rank.

Lightning's own mode handling is understood: the evaluation loop's ``eval()`` and its
restore of the saved modes afterwards (``_ModuleMode``) are not where the user set a
mode (``observe.modes``), and every ``optimizer.step(closure)`` is checked when the
closure returns, before the update. Works with ``lightning`` (``lightning.pytorch``) and
with ``pytorch_lightning``: Lightning calls a callback's hooks by name, so either base
class serves either Trainer; the one already imported is taken.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

from ._session import CallbackSession, counts_as_metrics


def _callback_base():
    for name in ("lightning.pytorch", "pytorch_lightning"):
        if sys.modules.get(name) is not None:
            return sys.modules[name].Callback, name.partition(".")[0]
    for name, package in (("lightning.pytorch", "lightning"), ("pytorch_lightning", "pytorch_lightning")):
        try:
            if importlib.util.find_spec(package) is not None:
                return importlib.import_module(name).Callback, package
        except (ImportError, ValueError):  # not installed, or blocked (sys.modules[...] = None)
            continue
    raise ImportError("modeguard.integrations.lightning needs PyTorch Lightning: pip install lightning "
                      "(or pytorch-lightning)")


Callback, _PACKAGE = _callback_base()
_LOGGER = "lightning.pytorch" if _PACKAGE == "lightning" else "pytorch_lightning"


class ModeGuardCallback(Callback):
    """Watches the LightningModule and its optimizers for train/eval mode mistakes during
    ``trainer.fit()``.

    Options are ``modeguard.watch()``'s (``on_violation`` defaults to ``"record"``: the
    report comes at the end), plus ``fail_on``: the lowest severity (``"error"``,
    ``"warning"``, ``"info"``, ``"never"``) that stops training at once with the rule's
    ``ModeGuardError``, before the bad update is applied; default ``MODEGUARD_FAIL_ON``,
    else ``"error"``. ``print_report=False`` leaves printing to you (``callback.report``).
    """

    def __init__(self, on_violation: str = "record", rules=None, frozen=None, backward_sample=None,
                 fail_on=None, print_report: bool = True):
        super().__init__()
        self.session = CallbackSession("Lightning", on_violation, rules, frozen, backward_sample, fail_on,
                                       print_report)
        self.session.logger_name = _LOGGER

    @property
    def guard(self):
        """The guard of the fit in progress (None outside fit)."""
        return self.session.guard

    @property
    def report(self):
        """The report of the last fit, once it ended."""
        return self.session.report

    def on_fit_start(self, trainer, pl_module) -> None:
        self.session.start(pl_module, trainer.optimizers, step_fn=getattr(type(pl_module), "training_step", None))

    def on_fit_end(self, trainer, pl_module) -> None:
        self._finish(trainer, raise_on_fail=True)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._finish(trainer, raise_on_fail=False)

    def teardown(self, trainer, pl_module, stage) -> None:
        self._finish(trainer, raise_on_fail=False)

    def _finish(self, trainer, raise_on_fail: bool) -> None:
        def log(report, summary):
            self.session.log(report, summary)
            for logger in getattr(trainer, "loggers", None) or ():
                logger.log_metrics(counts_as_metrics(report), step=trainer.global_step)

        self.session.finish(raise_on_fail, log=log, show=getattr(trainer, "is_global_zero", True))


__all__ = ["ModeGuardCallback"]
