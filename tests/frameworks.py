"""Small models and trainers for the framework tests (Lightning, transformers,
accelerate): CPU only, a few steps each, built from configs (nothing is downloaded).

Kept apart from tests/models.py so that the tests that do not use a framework never
import one. Trainer set-up is the cheapest each framework allows: no progress bar, no
logger, no checkpoints, no model summary.
"""

from __future__ import annotations

import inspect

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from models import IN_FEATURES, N_CLASSES

#: Lightning's and transformers' own warnings (few workers, no validation data, modules in
#: eval at the start, deprecations inside their code) do not matter here: the tests check
#: modeguard's. For a test module's ``pytestmark``.
FRAMEWORK_WARNINGS = [
    pytest.mark.filterwarnings(r"ignore::UserWarning:(pytorch_)?lightning"),
    pytest.mark.filterwarnings(r"ignore::DeprecationWarning:(pytorch_)?lightning"),
    pytest.mark.filterwarnings(r"ignore::FutureWarning:(transformers|accelerate)"),
    pytest.mark.filterwarnings(r"ignore::UserWarning:(transformers|accelerate)"),
]


def line_of(fn, marker: str) -> int:
    """The line in ``fn``'s source (a function, class or module) that ends with
    ``marker``, a comment such as ``# FORWARD``."""
    lines, first = inspect.getsourcelines(fn)
    first = max(first, 1)  # a module's source starts at 0
    hits = [first + i for i, text in enumerate(lines) if text.rstrip().endswith(marker)]
    assert len(hits) == 1, (marker, hits)
    return hits[0]


def loader(n: int = 48, batch: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN_FEATURES, generator=g)
    y = (x[:, 0] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch)


# ---- Lightning ----------------------------------------------------------------------------


class LitMLP(pl.LightningModule):
    """Linear -> BatchNorm -> ReLU -> Dropout -> Linear, trained by Lightning. Its
    training_step calls ``self(x)``, or with ``submodules`` its submodules one by one, as
    most LightningModules are written (then the model's own forward never runs)."""

    def __init__(self, manual: bool = False, skip_backward: bool = False, freeze_backbone: bool = False,
                 submodules: bool = False):
        super().__init__()
        self.submodules = submodules  # training_step calls the submodules, not self(x)
        self.backbone = nn.Sequential(nn.Linear(IN_FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(16, N_CLASSES)
        self.automatic_optimization = not manual
        self.skip_backward = skip_backward
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    def forward(self, x):
        return self.head(self.drop(self.backbone(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.head(self.drop(self.backbone(x))) if self.submodules else self(x)  # FORWARD
        loss = F.cross_entropy(out, y)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        if not self.skip_backward:
            self.manual_backward(loss)
        opt.step()  # MANUAL-STEP
        return None

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def lightning_trainer(callbacks=(), max_steps: int = 6, val_every: int = 0, **kwargs) -> pl.Trainer:
    """A Trainer at its cheapest; ``val_every`` runs validation every so many steps."""
    options = dict(
        max_steps=max_steps, enable_progress_bar=False, logger=False, enable_checkpointing=False,
        enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0,
    )
    if val_every:
        options.update(val_check_interval=val_every, limit_val_batches=2, check_val_every_n_epoch=None)
    else:
        options.update(limit_val_batches=0)
    options.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **options)


def fit(module, callbacks=(), val_every: int = 0, **kwargs):
    """``trainer.fit`` on the small data set; returns the trainer."""
    trainer = lightning_trainer(callbacks, val_every=val_every, **kwargs)
    trainer.fit(module, loader(), loader(16, seed=1) if val_every else None)
    return trainer


# ---- transformers ---------------------------------------------------------------------------


def bert_config():
    from transformers import BertConfig

    return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                      vocab_size=100, max_position_embeddings=32, num_labels=2)


def tiny_bert():
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(bert_config())


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=1))


class TokenData(Dataset):
    """Random token sequences with labels, as a Trainer takes them."""

    def __init__(self, n: int = 16, length: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(2, 100, (n, length), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


class FeatureData(Dataset):
    """Feature vectors with labels, for plain nn.Module models under the Trainer."""

    def __init__(self, n: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, IN_FEATURES, generator=g)
        self.labels = (self.x[:, 0] > 0).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.labels[i]}


class BackboneNet(nn.Module):
    """A BatchNorm backbone and a head, returning a loss as the Trainer expects."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(IN_FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, N_CLASSES)

    def forward(self, x, labels=None):
        logits = self.head(self.backbone(x))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class BackboneNetKeepsEval(BackboneNet):
    """The fix for transformers#24479: a train() override that keeps the frozen backbone
    in eval whatever the Trainer asks for."""

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self


def hf_trainer(model, tmp_path, callbacks=(), max_steps: int = 4, data=None, **kwargs):
    from transformers import Trainer, TrainingArguments

    options = dict(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=8, per_device_eval_batch_size=8,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    options.update(kwargs)
    data = data if data is not None else TokenData()
    return Trainer(model=model, args=TrainingArguments(**options), train_dataset=data, eval_dataset=data,
                   callbacks=list(callbacks))


def quiet_transformers():
    from transformers.utils import logging

    logging.set_verbosity_error()
