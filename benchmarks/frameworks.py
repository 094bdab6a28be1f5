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
