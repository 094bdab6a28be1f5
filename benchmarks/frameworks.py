"""Training steps inside the frameworks, for ``python -m benchmarks.instructions --only lightning,hf``.

A framework runs its own loop, so a step cannot be called from outside as the plain
workloads' are. Instead a callback that every setup carries counts the steps: the
instrumented window opens at the start of one training batch and closes at the start of
another, ``steps`` later, so it holds whole steps of the framework's loop (data loading,
hooks, forward, backward, optimizer step, zero_grad) and nothing of fit's start or end.

- ``lightning``: a LightningModule around an MLP (Linear, BatchNorm, ReLU, Dropout) whose
  ``training_step`` calls ``self(x)``, under ``pytorch_lightning.Trainer`` at its cheapest
  (no progress bar, logger, checkpoints or model summary).
- ``hf``: a tiny ``BertForSequenceClassification`` (built from a config: nothing is
  downloaded) under ``transformers.Trainer`` on random tokens; the Trainer calls
  ``model.train()`` at every step.

Setups: ``baseline`` (the counting callback only), ``callback`` (plus an empty callback of
the framework's kind: what any callback costs, since the frameworks call every hook of
every callback), ``watch`` (modeguard's own ``ModeGuardCallback`` for that framework) and
``auto`` (automatic mode, as ``modeguard run`` starts it, around the fit). modeguard's own
cost is ``watch`` less ``callback`` and ``auto`` less ``baseline``.
"""

from __future__ import annotations

import gc
import os
import tempfile
import warnings

NAMES = ("lightning", "hf")
ORDER = ["baseline", "callback", "watch", "auto"]
TITLES = {
    "baseline": "counting callback only",
    "callback": "plus an empty callback",
    "watch": "ModeGuardCallback",
    "auto": "modeguard run (automatic mode)",
}
#: modeguard's own added instructions per step, as a fraction of the framework's step.
FRAMEWORK_FRACTION = 0.02
WARMUP = 12  # uninstrumented steps first
BATCH = 8


class Window:
    """Opens the instrumented window at one step's start and closes it ``steps`` later;
    ``monitor`` sends a command to valgrind (``vgdb``), or is a stub outside it."""

    def __init__(self, steps: int, monitor):
        self.steps = steps
        self.monitor = monitor
        self.seen = 0
        self.closed = False

    def step_begins(self) -> None:
        n = self.seen
        self.seen += 1
        if n == WARMUP - 1:
            gc.collect()
            gc.disable()
            self.monitor("instrumentation", "on")  # one step instrumented before counting
        elif n == WARMUP:
            self.monitor("zero")
        elif n == WARMUP + self.steps:
            self.monitor("dump")
            self.monitor("instrumentation", "off")
            gc.enable()
            self.closed = True

    @property
    def max_steps(self) -> int:
        return WARMUP + self.steps + 1


def _quiet():
    warnings.filterwarnings("ignore")
    import logging

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


# ---- Lightning ------------------------------------------------------------------------------

def _lightning(key: str, window: Window) -> int:
    import pytorch_lightning as pl
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    class LitMLP(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(0.1),
                                     nn.Linear(128, 10))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Counting(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            window.step_begins()

    callbacks = [Counting()]
    if key == "callback":
        callbacks.append(pl.Callback())
    if key == "watch":
        from modeguard.integrations.lightning import ModeGuardCallback

        callbacks.append(watcher := ModeGuardCallback(print_report=False))
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n = BATCH * (window.max_steps + 2)
    x = torch.randn(n, 64, generator=g)
    data = DataLoader(TensorDataset(x, torch.randint(0, 10, (n,), generator=g)), batch_size=BATCH)
    trainer = pl.Trainer(callbacks=callbacks, max_steps=window.max_steps, enable_progress_bar=False, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, accelerator="cpu", devices=1,
                         num_sanity_val_steps=0, limit_val_batches=0)
    model = LitMLP()
    trainer.fit(model, data)
    return (len(watcher.report) if key == "watch" else 0), len(list(model.modules()))


# ---- Hugging Face Trainer -------------------------------------------------------------------

def _hf(key: str, window: Window) -> int:
    import torch
    from torch.utils.data import Dataset
    from transformers import (BertConfig, BertForSequenceClassification, Trainer, TrainerCallback,
                              TrainingArguments)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    class Tokens(Dataset):
        def __init__(self, n):
            g = torch.Generator().manual_seed(0)
            self.ids = torch.randint(2, 100, (n, 16), generator=g)
            self.labels = torch.randint(0, 2, (n,), generator=g)

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                    "labels": self.labels[i]}

    class Counting(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            window.step_begins()

    callbacks = [Counting()]
    if key == "callback":
        callbacks.append(TrainerCallback())
    if key == "watch":
        from modeguard.integrations.transformers import ModeGuardCallback

        callbacks.append(watcher := ModeGuardCallback(print_report=False))
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
        max_position_embeddings=32, num_labels=2))
    with tempfile.TemporaryDirectory(prefix="modeguard-hf-") as out:
        args = TrainingArguments(output_dir=out, max_steps=window.max_steps, per_device_train_batch_size=BATCH,
                                 report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                                 disable_tqdm=True, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=Tokens(BATCH * (window.max_steps + 2)),
                          callbacks=callbacks)
        trainer.train()
    return (len(watcher.report) if key == "watch" else 0), len(list(model.modules()))


RUNNERS = {"lightning": _lightning, "hf": _hf}
MODELS = {"lightning": "LightningModule around an MLP", "hf": "tiny BertForSequenceClassification"}


def run(name: str, key: str, steps: int, monitor) -> dict:
    """One fit of ``name`` under setup ``key``, with ``steps`` steps in the window.
    Returns the findings (expected 0: the loops are correct)."""
    _quiet()
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    window = Window(steps, monitor)
    if key == "auto":
        from modeguard import _auto as auto

        auto.start(on_violation="record")
        try:
            _, n_modules = RUNNERS[name]("baseline", window)
        finally:
            found = len(auto.stop().violations)
    else:
        found, n_modules = RUNNERS[name](key, window)
    if not window.closed:
        raise RuntimeError(f"{name}/{key}: the fit ended after {window.seen} steps, before the window closed")
    return {"findings": found, "n_modules": n_modules}


def summarise(parts: list) -> list:
    """One row per framework workload: per setup the median over seeds; modeguard's own
    added instructions (``watch`` less ``callback``, ``auto`` less ``baseline``) as a
    fraction of the baseline step."""
    import statistics

    rows = []
    for name in dict.fromkeys(p["workload"] for p in parts):
        mine = [p for p in parts if p["workload"] == name]
        keys = [k for k in ORDER if any(p["key"] == k for p in mine)]
        med = {k: statistics.median(p["per_step"]["train"] for p in mine if p["key"] == k) for k in keys}
        base = med["baseline"]
        own = {}
        if "watch" in med:
            own["watch"] = med["watch"] - med.get("callback", base)
        if "auto" in med:
            own["auto"] = med["auto"] - base
        rows.append({"workload": name, "n_modules": mine[0]["n_modules"], "seeds": sorted({p["seed"] for p in mine}),
                     "findings": {k: sum(p["findings"] for p in mine if p["key"] == k) for k in keys},
                     "per_step": med, "added": {k: med[k] - base for k in keys},
                     "own": own, "own_fraction": {k: v / base for k, v in own.items()},
                     "met": all(v / base <= FRAMEWORK_FRACTION for v in own.values())})
    return rows


def markdown(rows: list) -> str:
    lines = ["## Training step inside the frameworks", "",
             "Instructions per training step of the framework's own loop (median over the seeds). "
             "modeguard's own = `watch` less the empty callback (any callback costs the framework's hook "
             f"calls), `run` less the baseline; the target is at most {FRAMEWORK_FRACTION:.0%} of the step.", "",
             "| workload | baseline | empty callback | ModeGuardCallback | modeguard run | "
             "modeguard's own, watch | modeguard's own, run | met |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, own, frac = r["added"], r["own"], r["own_fraction"]

        def cell(k, d=a):
            return f"{d[k]:+,.0f}" if k in d else "n/a"

        lines.append(f"| {r['workload']}: {MODELS.get(r['workload'], '')} ({r['n_modules']} modules) | {r['per_step']['baseline']:,.0f} | "
                     f"{cell('callback')} | {cell('watch')} | {cell('auto')} | "
                     + " | ".join(f"{own[k]:+,.0f} ({frac[k]:.2%})" if k in own else "n/a" for k in ("watch", "auto"))
                     + f" | {'yes' if r['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


# ---- time and function calls per step: python -m benchmarks.frameworks ----------------------

class Timer:
    """A monitor for ``Window``: the window's wall time, and with ``calls`` the Python and
    C function calls made in it (``sys.setprofile``; a separate run, since profiling slows
    every call)."""

    def __init__(self, calls: bool = False):
        self.calls = calls
        self.n = 0
        self.started = self.seconds = None

    def _count(self, frame, event, arg):
        if event == "call" or event == "c_call":
            self.n += 1

    def __call__(self, *cmd):
        import sys
        import time

        if cmd[0] == "zero":
            if self.calls:
                sys.setprofile(self._count)
            self.started = time.perf_counter()
        elif cmd[0] == "dump":
            self.seconds = time.perf_counter() - self.started
            if self.calls:
                sys.setprofile(None)


def _timed_child(name: str, key: str, steps: int, what: str, result_path: str) -> None:
    import json

    timer = Timer(calls=what == "calls")
    info = run(name, key, steps, timer)
    with open(result_path, "w") as f:
        json.dump({**info, "us_per_step": timer.seconds / steps * 1e6, "calls_per_step": timer.n / steps}, f)


def _measure_timed(name: str, key: str, steps: int, what: str, workdir: str) -> dict:
    import json
    import subprocess
    import sys

    path = os.path.join(workdir, f"{name}.{key}.{what}.json")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.frameworks", "--child", name, key, str(steps), what, path],
                          cwd=root, capture_output=True, text=True, env=dict(os.environ, PYTHONHASHSEED="0"))
    if proc.returncode != 0 or not os.path.exists(path):
        raise RuntimeError(f"{name}/{key}: the measured process failed:\n{proc.stderr[-3000:]}")
    with open(path) as f:
        return json.load(f)


#: Steps in the timed window: each a whole step of the framework's loop.
TIMED_STEPS = {"lightning": 300, "hf": 60}


def timed(names, rounds: int, log=print) -> list:
    """Per workload: microseconds per step of each setup, each round a fresh process per
    setup (in an order rotated from round to round, so no setup always runs first), and
    the function calls per step from one profiled run per setup; see ``timed_row``."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="modeguard-frameworks-") as tmp:
        for name in names:
            steps = TIMED_STEPS[name]
            calls = {k: _measure_timed(name, k, 32, "calls", tmp) for k in ORDER}
            us = {k: [] for k in ORDER}
            found = {k: c["findings"] for k, c in calls.items()}
            for r in range(rounds):
                for k in ORDER[r % len(ORDER):] + ORDER[:r % len(ORDER)]:
                    m = _measure_timed(name, k, steps, "time", tmp)
                    us[k].append(m["us_per_step"])
                    found[k] += m["findings"]
                log(f"  {name}, round {r + 1}/{rounds}: " + ", ".join(f"{k} {us[k][-1]:,.0f} us" for k in ORDER))
            rows.append(timed_row(name, steps, us, {k: c["calls_per_step"] for k, c in calls.items()}, found,
                                  calls["baseline"]["n_modules"]))
    return rows


def timed_row(name: str, steps: int, us: dict, calls: dict, found: dict, n_modules: int) -> dict:
    """``us``: setup -> microseconds per step, one per round. Ratios against the same
    round's baseline (and ``own_watch``: ``watch`` against the same round's empty
    callback, modeguard's own), median and range over the rounds; added calls against
    the baseline's."""
    import statistics

    ratio = {k: [a / b for a, b in zip(us[k], us["baseline"])] for k in us if k != "baseline"}
    if "watch" in us and "callback" in us:
        ratio["own_watch"] = [a / b for a, b in zip(us["watch"], us["callback"])]
    return {
        "workload": name, "n_modules": n_modules, "steps": steps, "rounds": len(us["baseline"]),
        "us_per_step": {k: statistics.median(v) for k, v in us.items()}, "us_all": us,
        "ratio": {k: statistics.median(v) for k, v in ratio.items()},
        "ratio_range": {k: [min(v), max(v)] for k, v in ratio.items()},
        "calls_per_step": calls, "added_calls": {k: c - calls["baseline"] for k, c in calls.items()},
        "findings": found,
    }


def timed_markdown(rows: list, meta: dict) -> str:
    lines = ["# modeguard inside the frameworks: step time and function calls", "",
             f"- {meta['date']}; {meta['cpu']}, {meta['cpu_count']} cores; torch {meta['torch']}, Python "
             f"{meta['python']}, commit {meta['modeguard_commit']}; one torch thread",
             "- each setup in a fresh process per round, the setups' order rotated from round to round; "
             "ratio = the setup's time per step over the same round's baseline (median, and range, over the rounds); "
             "own = ModeGuardCallback over the empty callback (any callback costs the framework's hook calls)",
             "- function calls per step: Python and C calls counted with `sys.setprofile` in a separate run "
             "(deterministic)", "",
             "| workload | baseline µs/step | empty callback | ModeGuardCallback | own (watch / empty callback) | "
             "modeguard run | added calls: empty callback | ModeGuardCallback | modeguard run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q, rg, c = r["ratio"], r["ratio_range"], r["added_calls"]

        def cell(k):
            return f"{q[k]:.3f} ({rg[k][0]:.3f} to {rg[k][1]:.3f})"

        lines.append(f"| {r['workload']}: {MODELS[r['workload']]} ({r['n_modules']} modules), {r['rounds']} rounds of "
                     f"{r['steps']} steps | {r['us_per_step']['baseline']:,.0f} | {cell('callback')} | {cell('watch')} | "
                     f"{cell('own_watch')} | {cell('auto')} | {c['callback']:+.1f} | {c['watch']:+.1f} | {c['auto']:+.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import argparse
    import json
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        _timed_child(argv[1], argv[2], int(argv[3]), argv[4], argv[5])
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.frameworks",
                                description="Step time and function calls per step inside Lightning and the HF Trainer.")
    p.add_argument("--only", metavar="NAMES", default=",".join(NAMES), help="comma-separated, of lightning,hf")
    p.add_argument("--rounds", type=int, default=5, help="rounds of every setup (default 5)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--markdown", metavar="PATH")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    for n in names:
        if n not in NAMES:
            p.error(f"--only: unknown framework workload {n!r}; expected some of {', '.join(NAMES)}")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    from .__main__ import machine_info

    meta = machine_info(threads=1)
    rows = timed(names, args.rounds, log=lambda *a: print(*a, flush=True))
    text = timed_markdown(rows, meta)
    print()
    print(text)
    from .report import write_outputs

    write_outputs((args.json, json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n"), (args.markdown, text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
