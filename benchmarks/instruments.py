"""The instrumentations being compared. Each is installed on a workload before a timed
block and removed after it, so blocks of different columns can alternate in one process.

``naive`` is the straightforward design modeguard is measured against: a forward pre-hook
on every submodule that records its ``training`` flag and the grad state on each call, and
a patched ``Tensor.backward`` that looks at those records. ``torcheck`` is the published
peer (it wraps ``optimizer.step`` and the model's ``forward``), with the checks its README
starts from.
"""

from __future__ import annotations

from typing import Optional

import torch

import modeguard
from modeguard import _auto as auto


class Instrument:
    key = "baseline"
    title = "no instrumentation"

    def available(self) -> Optional[str]:
        """None if usable here, else why not."""
        return None

    def install(self, workload) -> None:
        pass

    def uninstall(self, workload) -> None:
        pass

    def violations(self) -> int:
        """Findings during the run (the benchmark loops are correct: expected 0)."""
        return 0

    def sample_eval_forwards(self, every: bool) -> None:
        """modeguard setups: sample (MG202) the first eval forward after every mode change
        (``every``), or none; the benchmark's mode-change phases compare the two."""


def _set_eval_sample(guard, every: bool) -> None:
    # The guard's sample bound (observe/calls.py): every eval-mode snapshot, or none.
    guard.eval_sample_first, guard.eval_sample_every = (1 << 30, 1) if every else (0, 1 << 30)


class Baseline(Instrument):
    pass


class BaselineAgain(Instrument):
    """No instrumentation, timed as a column of its own: the A/A comparison shows the
    noise floor of the run (any other column's difference within it is noise)."""

    key = "again"
    title = "no instrumentation, again (noise floor)"


class ModeguardWatch(Instrument):
    key = "watch"
    title = "modeguard.watch(model, optimizer)"

    def __init__(self):
        self.guard = None
        self._found = 0

    def install(self, workload) -> None:
        self.guard = modeguard.watch(workload.model, workload.optimizer, on_violation="record")

    def uninstall(self, workload) -> None:
        self._found += len(self.guard.violations)
        self.guard.unwatch()
        self.guard = None

    def violations(self) -> int:
        return self._found

    def sample_eval_forwards(self, every: bool) -> None:
        _set_eval_sample(self.guard, every)


class ModeguardAuto(Instrument):
    key = "auto"
    title = "modeguard run (automatic mode)"

    def __init__(self):
        self._found = 0

    def install(self, workload) -> None:
        auto.start(on_violation="record")

    def uninstall(self, workload) -> None:
        guard = auto.stop()
        self._found += len(guard.violations)

    def violations(self) -> int:
        return self._found

    def sample_eval_forwards(self, every: bool) -> None:
        _set_eval_sample(auto.current(), every)


class NaiveReference(Instrument):
    key = "naive"
    title = "naive per-module hooks"

    def __init__(self):
        self._handles = []
        self._orig_backward = None
        self.records: dict = {}
        self.backwards = 0
        self.eval_in_graph = 0

    def install(self, workload) -> None:
        records = self.records

        def record_mode(module, args):
            records[id(module)] = (module.training, torch.is_grad_enabled())

        self._handles = [m.register_forward_pre_hook(record_mode) for m in workload.model.modules()]
        orig = self._orig_backward = torch.Tensor.backward
        ref = self

        def backward(self, *args, **kwargs):
            # Did any module of the graph being backpropagated run in eval mode?
            ref.backwards += 1
            if any(grad and not training for training, grad in records.values()):
                ref.eval_in_graph += 1
            return orig(self, *args, **kwargs)

        torch.Tensor.backward = backward

    def uninstall(self, workload) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        torch.Tensor.backward = self._orig_backward
        self.records.clear()

    def violations(self) -> int:
        return self.eval_in_graph


class HookFloor(Instrument):
    """An empty forward hook on the model and an empty step pre-hook on the optimizer: what
    any design built on PyTorch's hooks pays before its hooks do anything (a hooked module
    runs on torch's slower call path). Counted by ``benchmarks.instructions`` only."""

    key = "floor"
    title = "empty forward hook + step pre-hook"

    def __init__(self):
        self._handles = []

    def install(self, workload) -> None:
        self._handles = [
            workload.model.register_forward_hook(lambda module, args, output: None),
            workload.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: None),
        ]

    def uninstall(self, workload) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class Torcheck(Instrument):
    key = "torcheck"
    title = "torcheck"

    def __init__(self):
        self.registry = None
        self._found = 0

    def available(self) -> Optional[str]:
        try:
            import torcheck  # noqa: F401
        except ImportError:
            return "torcheck is not installed (pip install --no-deps torcheck)"
        return None

    def install(self, workload) -> None:
        from torcheck.registry import Registry

        # A registry per block (torcheck's module-level one cannot unregister). The checks
        # of torcheck's README: parameters must change each step, no NaN/inf anywhere.
        reg = self.registry = Registry()
        reg.register(workload.optimizer)
        reg.add_module_changing_check(workload.model, module_name="model")
        reg.add_module_nan_check(workload.model, module_name="model")
        reg.add_module_inf_check(workload.model, module_name="model")
        # torcheck raises from step() when a parameter did not change; on long runs it
        # does so on correct loops (a BatchNorm weight of the ResNet, for one). Count that
        # as a finding (a false positive: the loops are correct) and go on.
        checked_step = workload.optimizer.step
        inst = self

        def step(*args, **kwargs):
            try:
                return checked_step(*args, **kwargs)
            except RuntimeError as exc:
                if "errors are detected while training" not in str(exc):
                    raise
                inst._found += 1

        workload.optimizer.step = step

    def uninstall(self, workload) -> None:
        # torcheck wraps by setting instance attributes; deleting them restores the class's.
        for obj, name in ((workload.optimizer, "step"), (workload.model, "forward")):
            if name in vars(obj):
                delattr(obj, name)
        self.registry = None

    def violations(self) -> int:
        return self._found


def all_instruments() -> list:
    return [Baseline(), BaselineAgain(), ModeguardWatch(), ModeguardAuto(), NaiveReference(), Torcheck()]
