"""Structural facts behind the overhead numbers (never timings), and a smoke run of the
benchmark harness. Also: watching adds no tensor operation at all, so on a GPU it cannot add a
device synchronization (checked here on CPU with a dispatch-mode recorder).

The hot path must not walk the module tree while modes stay the same: these tests count
calls to ``named_modules``/``modules`` on the watched model and ``ModeSnapshot`` builds
across 100 training steps and evaluation forwards, after a warm-up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import modeguard
import modeguard._hotpath as hotpath_module
from modeguard import _auto as auto
from modeguard.observe import modes
from modeguard.observe import snapshot as snapshot_module

from benchmarks.instruments import all_instruments
from benchmarks.workloads import MLP, deep_stack

ROOT = Path(__file__).resolve().parents[1]


class _Counter:
    """Counts tree walks rooted at ``model`` and snapshot builds anywhere."""

    def __init__(self, monkeypatch, model):
        self.walks = 0
        self.snapshots = 0
        orig_named, orig_modules = nn.Module.named_modules, nn.Module.modules
        orig_init = snapshot_module.ModeSnapshot.__init__
        counter = self

        def named_modules(self, *a, **k):
            if self is model:
                counter.walks += 1
            return orig_named(self, *a, **k)

        def modules(self):
            if self is model:
                counter.walks += 1
            return orig_modules(self)

        def init(self, *a, **k):
            counter.snapshots += 1
            return orig_init(self, *a, **k)

        monkeypatch.setattr(nn.Module, "named_modules", named_modules)
        monkeypatch.setattr(nn.Module, "modules", modules)
        monkeypatch.setattr(snapshot_module.ModeSnapshot, "__init__", init)

    def reset(self):
        self.walks = self.snapshots = 0


_LOSS = nn.CrossEntropyLoss()  # one instance: a new loss module would be a new root in auto mode


def _loop(model, opt, x, y, steps, loss_fn=_LOSS):
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()


def _setup(depth=None):
    torch.manual_seed(0)
    if depth is None:
        model, x = MLP(), torch.randn(8, 64)
        y = torch.randint(0, 10, (8,))
    else:
        model, x = deep_stack(depth), torch.randn(4, 16)
        y = torch.randint(0, 16, (4,))
    return model, torch.optim.SGD(model.parameters(), lr=0.01), x, y


@pytest.mark.parametrize("mode", ["watch", "auto"])
@pytest.mark.parametrize("depth", [None, 20])
def test_unchanged_modes_never_walk_the_model(monkeypatch, mode, depth):
    model, opt, x, y = _setup(depth)
    guard = modeguard.watch(model, opt, on_violation="record") if mode == "watch" else auto.start(on_violation="record")
    try:
        counter = _Counter(monkeypatch, model)
        model.train()
        _loop(model, opt, x, y, 3)  # warm-up: the first forward after a mode change rescans
        counter.reset()
        _loop(model, opt, x, y, 100)
        assert (counter.walks, counter.snapshots) == (0, 0)

        model.eval()
        with torch.inference_mode():
            model(x)  # mode changed: exactly one rescan
        assert counter.snapshots == 1
        counter.reset()
        with torch.inference_mode():
            for _ in range(100):
                model(x)
        assert (counter.walks, counter.snapshots) == (0, 0)
    finally:
        guard.unwatch() if mode == "watch" else auto.stop()
    assert guard.violations == []


@pytest.fixture
def followed(monkeypatch):
    """The ForwardRecord of every forward followed into its autograd graph."""
    records = []
    real_attach = hotpath_module.attach
    monkeypatch.setattr(hotpath_module, "attach", lambda rec, *a: (records.append(rec), real_attach(rec, *a)))
    return records


@pytest.mark.parametrize("mode", ["watch", "auto"])
def test_ordinary_training_forwards_are_not_followed_into_the_graph(followed, mode):
    # Following a forward into autograd (a pre-hook on its output's grad_fn, a Python
    # call inside backward) is the dearest thing modeguard does; an ordinary training
    # loop pays for it only until its first steps show that its gradients are replaced
    # at every step (zero_grad(set_to_none=True)), after which the steps read the
    # gradients instead.
    model, opt, x, y = _setup()
    guard = modeguard.watch(model, opt, on_violation="record") if mode == "watch" else auto.start(on_violation="record")
    try:
        _loop(model, opt, x, y, 320)
    finally:
        guard.unwatch() if mode == "watch" else auto.stop()
    assert 1 <= len(followed) <= 3  # until the second zero_grad shows the gradients replaced
    assert all(rec.used for rec in followed)  # each followed forward saw its backward
    assert guard.violations == []


def test_backward_sample_follows_one_ordinary_forward_in_n(followed):
    model, opt, x, y = _setup()
    with modeguard.watch(model, opt, on_violation="record", backward_sample=16) as guard:
        _loop(model, opt, x, y, 320)
    expected = 320 / 16
    assert expected / 2 <= len(followed) <= expected * 2
    assert guard.violations == []


def test_an_ordinary_step_calls_no_step_rule(monkeypatch):
    # The step rules say, once per snapshot, when they have nothing to say (Rule.step_quiet);
    # a step in an ordinary loop then calls none of them.
    from modeguard.rules import RULES
    from modeguard.rules._base import overrides

    called = []
    for rule in RULES.values():
        if overrides(rule, "on_step"):
            real = type(rule).on_step

            def spy(self, *args, _real=real):
                called.append(self.code)
                return _real(self, *args)

            monkeypatch.setattr(type(rule), "on_step", spy)
    step_rules = {code for code, rule in RULES.items() if overrides(rule, "on_step")}
    assert step_rules == {"MG101", "MG301", "MG602"}
    model, opt, x, y = _setup()
    with modeguard.watch(model, opt, on_violation="record") as guard:
        _loop(model, opt, x, y, 100)
        assert called == []
        opt.step()  # no new gradients: every step rule hears of it (MG602 fires)
        assert sorted(called) == sorted(step_rules)
        called.clear()
        model.eval()  # the validate bug: the next step is not quiet for MG101
        _loop(model, opt, x, y, 1)
        assert sorted(called) == sorted(step_rules)
    assert [v.code for v in guard.violations] == ["MG602", "MG101"]


def _python_calls(fn) -> list:
    """The Python functions ``fn()`` calls, by file and name (C functions left out)."""
    import sys

    calls = []

    def profile(frame, event, arg):
        if event == "call":
            calls.append((frame.f_code.co_filename, frame.f_code.co_name))

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls[:-1]  # the last is sys.setprofile's own return into this frame


def _modeguard_calls(calls):
    return [name for path, name in calls if "modeguard" in path]


def test_assignments_and_unchanged_train_calls_stay_on_the_fast_path():
    # Lightning assigns attributes on the LightningModule around every hook call, and the
    # Hugging Face Trainer calls model.train() at every step. An assignment of anything
    # but `training` runs no modeguard code at all; an unchanged train() costs one call
    # of the patched train() and of the flag's setter per module and nothing more (no
    # bookkeeping, no stack walk), with the same detection when a flag does change.
    model, opt, _, _ = _setup()
    n = len(list(model.modules()))

    def assign():
        model.note = 1

    with modeguard.watch(model, opt, on_violation="record"):
        model.train()
        assert _python_calls(assign) and _modeguard_calls(_python_calls(assign)) == []
        assert _modeguard_calls(_python_calls(model.train)) == ["train", "__set__"] * n
        model.net[1].training = False  # a direct assignment is still seen
        assert modes.last_set(model.net[1]).how == "assignment"
        changed = _modeguard_calls(_python_calls(model.train))
        assert "_note_training" in changed
    plain = _python_calls(assign)
    assert [c for c in plain if "modeguard" in c[0]] == []


def test_backward_sample_one_follows_every_training_forward(followed):
    model, opt, x, y = _setup()
    with modeguard.watch(model, opt, on_violation="record", backward_sample=1):
        _loop(model, opt, x, y, 20)
    assert len(followed) == 20


class _TensorOps(TorchDispatchMode):
    """Every tensor operation that reaches the dispatcher, in order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _loop_with_every_path(model, opt, x, y):
    """Ordinary steps, an evaluation with no_grad, one without (followed into its graph,
    MG401), and the validate bug (a step in eval mode: MG101 and its report)."""
    for i in range(40):
        model.train()
        _loop(model, opt, x, y, 1)
        if i % 10 == 9:
            model.eval()
            with torch.no_grad():
                model(x)
            model(x)
    _loop(model, opt, x, y, 1)


@pytest.mark.parametrize("mode", ["watch", "auto"])
@pytest.mark.parametrize("sample", [None, 1])
def test_watching_adds_no_tensor_operation(mode, sample):
    # Not one extra aten op, on the hot path or the slow one: modeguard never reads a
    # tensor's value (on a GPU, that read would synchronize the device) and never copies
    # or allocates a tensor. The same loop, unwatched and watched, dispatches the same ops.
    def run(watched):
        model, opt, x, y = _setup()
        guard = None
        if watched:
            guard = (modeguard.watch(model, opt, on_violation="record", backward_sample=sample) if mode == "watch"
                     else auto.start(on_violation="record", backward_sample=sample))
        try:
            with _TensorOps() as rec:
                _loop_with_every_path(model, opt, x, y)
        finally:
            if watched:
                guard.unwatch() if mode == "watch" else auto.stop()
        return rec.ops, guard

    plain, _ = run(False)
    watched, guard = run(True)
    assert {v.code for v in guard.violations} == {"MG401", "MG101"}  # the slow path ran too
    assert len(plain) > 1000
    assert watched == plain


def test_op_recorder_sees_a_value_read():
    # What the test above would catch: .item() or bool() of a tensor, a clone.
    t = torch.ones(2, requires_grad=True)
    with _TensorOps() as rec:
        t.sum().item()
        bool(t[0] > 0)
        t.detach().clone()
    assert rec.ops.count("aten._local_scalar_dense.default") == 2
    assert "aten.clone.default" in rec.ops


def test_counter_sees_a_walk(monkeypatch):
    # The counter itself must be able to fail the test above.
    model, *_ = _setup()
    counter = _Counter(monkeypatch, model)
    list(model.modules())
    snapshot_module.ModeSnapshot(model)
    assert counter.walks >= 2 and counter.snapshots == 1


def test_instruments_install_and_remove_cleanly():
    from benchmarks.workloads import cpu_workloads

    w = cpu_workloads(quick=True)[0]
    orig_backward, orig_call = torch.Tensor.backward, nn.Module.__call__
    for inst in all_instruments():
        if inst.available() is not None:
            continue
        inst.install(w)
        try:
            for phase in ("train", "eval"):
                w.set_phase(phase)
                for _ in range(2):
                    w.operation(phase)()
        finally:
            inst.uninstall(w)
        assert torch.Tensor.backward is orig_backward and nn.Module.__call__ is orig_call
        assert not w.model._forward_pre_hooks and not w.model._forward_hooks
        assert all(not m._forward_pre_hooks for m in w.model.modules())
        assert "forward" not in vars(w.model) and "step" not in vars(w.optimizer)
        assert inst.violations() == 0, inst.key
    assert not modeguard.observe.modes.is_patched()


def test_quick_run_end_to_end(tmp_path):
    out = tmp_path / "r.json"
    md = tmp_path / "r.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--json", str(out), "--markdown", str(md)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["meta"]["torch"] == torch.__version__
    assert {"date", "cpu", "torch_threads"} <= set(data["meta"])
    row = data["cpu"][0]
    assert row["workload"] == "mlp"
    for phase in ("train", "eval"):
        cols = row["timing"][phase]
        assert {"baseline", "watch", "auto", "naive"} <= set(cols)
        assert cols["baseline"]["ratio"] == 1.0
        assert all(c["median_us"] > 0 and c["n_samples"] > 0 for c in cols.values())
    assert all(v == 0 for v in row["findings"].values())
    calls = row["calls_per_step"]
    assert calls["again"] == calls["baseline"]  # the counter itself is deterministic
    assert calls["baseline"] < calls["watch"] < calls["naive"]
    assert "## CPU: added function calls per training step" in md.read_text()
    sweep = data["scaling"]
    assert [r["blocks"] for r in sweep] == [10, 30]
    # Deterministic: the naive design adds calls per module, modeguard.watch does not.
    naive = [r["columns"]["naive"]["added_calls"] for r in sweep]
    watch = [r["columns"]["watch"]["added_calls"] for r in sweep]
    assert naive[1] > naive[0] + 40
    assert watch[1] == watch[0]
    if not torch.cuda.is_available():
        assert "CUDA is not available" in data["gpu"]
    assert "| mlp (11 modules) | train step |" in md.read_text()


def test_amp_workloads_and_the_gpu_report_run_on_cpu():
    # The GPU/AMP set runs only where CUDA is; its code (autocast, GradScaler, the GPU
    # tables and targets) runs here on CPU, with a Transformer small enough for a test.
    import argparse

    from benchmarks import __main__ as bench_main, report
    from benchmarks.workloads import TransformerClassifier, _classification

    g = torch.Generator().manual_seed(0)
    wls = [_classification("transformer", TransformerClassifier(d_model=32, heads=2, layers=1, ff=64),
                           torch.randint(0, 1000, (4, 8), generator=g), 10, "cpu", amp) for amp in ("bf16", "fp16")]
    assert wls[1].scaler is not None and wls[0].scaler is None
    args = argparse.Namespace(rounds=1, block_time=0.02, threads=1, timer="cpu", quick=True)
    instruments = [i for i in all_instruments() if i.available() is None]
    rows = bench_main.run_set("GPU", wls, instruments, args, log=lambda *a: None)
    assert [r["label"] for r in rows] == ["transformer [bf16]", "transformer [fp16]"]
    assert all(v == 0 for r in rows for k, v in r["findings"].items() if k != "torcheck")
    result = {"gpu": rows}
    targets = report.check_targets(result)
    names = [t["target"] for t in targets]
    for label in ("transformer [bf16]", "transformer [fp16]"):
        assert f"GPU {label} train-step ratio, modeguard.watch" in names
        assert f"GPU {label} peak memory ratio, modeguard run" in names
    assert not any("syncs" in n for n in names)  # counted on CUDA only
    assert report.timing_table(rows).count("| transformer [fp16] (") == 2
    assert "| transformer [bf16] |" in report.memory_table(rows)


def test_the_compiled_workload_is_measured_with_modeguard_only_and_is_watched_through_its_wrapper():
    import torch._dynamo

    from benchmarks import workloads
    from benchmarks.instruments import ModeguardWatch

    torch._dynamo.reset()
    w = workloads.compiled_mlp()
    w.compile = "eager"  # the structure, not inductor's C++ build
    w.call = torch.compile(w.model, backend="eager")
    assert w.label == "mlp_compiled" and set(w.instrument_keys) == {"baseline", "again", "watch", "auto"}
    inst = ModeguardWatch()
    inst.install(w)
    try:
        w.set_phase("eval")
        for _ in range(2):
            w.train_step()  # a training step in eval: found through the compiled wrapper
        assert [v.code for v in inst.guard.violations] == ["MG101"]
    finally:
        inst.uninstall(w)
    assert not w.model._forward_hooks and not w.call._forward_hooks
