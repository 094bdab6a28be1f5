"""Small models shared by the tests: each one is the smallest thing that shows one
pattern (a mode-sensitive layer type, a fine-tuning layout, a train() override, a GAN).

Everything here is CPU-only, deterministic when seeded, and builds in milliseconds.
Other test files import from it, so names and constructor signatures stay stable.
"""

from __future__ import annotations

import collections
import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

IN_FEATURES = 8
N_CLASSES = 3


#: Structures a forward may return its prediction in, besides plain tensors and dicts.
Pair = collections.namedtuple("Pair", "logits aux")


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    extra: int = 0


def batch(n: int = 16, features: int = IN_FEATURES, seed: int = 0) -> torch.Tensor:
    """A reproducible batch of inputs for the MLP-like models."""
    return torch.randn(n, features, generator=torch.Generator().manual_seed(seed))


def image_batch(n: int = 4, channels: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    """A reproducible batch of small images for the CNNs."""
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def labels(n: int = 16, classes: int = N_CLASSES, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


class MLP(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Dropout -> Linear: the everyday classifier."""

    def __init__(self, features: int = IN_FEATURES, hidden: int = 16, classes: int = N_CLASSES, p: float = 0.5):
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc2(self.drop(F.relu(self.bn(self.fc1(x)))))


class Passthrough(MLP):
    """A ``train()`` override that only passes its arguments on: the user's own
    ``eval()``/``train()``, not an intentional override like ``NormEvalNet``'s."""

    def train(self, *args, **kwargs):
        return super().train(*args, **kwargs)


class OwnGetstate(MLP):
    """A ``__getstate__`` that does not call nn.Module's (as nn.LSTM's does not), so
    copies and pickles bypass a wrapper on ``nn.Module.__getstate__``."""

    def __getstate__(self):
        return dict(self.__dict__)


class SmallCNN(nn.Module):
    """Conv -> BatchNorm2d -> ReLU -> pool -> Linear."""

    def __init__(self, channels: int = 3, classes: int = N_CLASSES):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(self.pool(F.relu(self.bn(self.conv(x)))).flatten(1))


class PlainMLP(nn.Module):
    """No mode-sensitive module at all: train and eval compute the same thing."""

    def __init__(self, features: int = IN_FEATURES, hidden: int = 16, classes: int = N_CLASSES):
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.act = nn.ReLU()
        self.ln = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc2(self.ln(self.act(self.fc1(x))))


class HFStyleBlock(nn.Module):
    """Hugging Face style: no Dropout module; the forward calls ``F.dropout`` with
    ``training=self.training`` and a float ``dropout`` attribute from the config."""

    def __init__(self, features: int = IN_FEATURES, hidden: int = 16, dropout: float = 0.1):
        super().__init__()
        self.dense = nn.Linear(features, hidden)
        self.dropout = dropout

    def forward(self, x):
        return F.dropout(F.gelu(self.dense(x)), p=self.dropout, training=self.training)


class HFStyleModel(nn.Module):
    def __init__(self, features: int = IN_FEATURES, hidden: int = 16, classes: int = N_CLASSES, dropout: float = 0.1):
        super().__init__()
        self.block = HFStyleBlock(features, hidden, dropout)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.block(x))


class Backbone(nn.Module):
    """A feature extractor with both kinds of sensitive module (BatchNorm and Dropout)."""

    def __init__(self, features: int = IN_FEATURES, hidden: int = 16):
        super().__init__()
        self.fc = nn.Linear(features, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.drop(F.relu(self.bn(self.fc(x))))


class FineTuneNet(nn.Module):
    """``backbone`` + ``fc`` head: the fine-tuning layout (freeze the backbone, train fc)."""

    def __init__(self, features: int = IN_FEATURES, hidden: int = 16, classes: int = N_CLASSES):
        super().__init__()
        self.backbone = Backbone(features, hidden)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc(self.backbone(x))

    def freeze_backbone(self) -> "FineTuneNet":
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        return self


class NormEvalNet(FineTuneNet):
    """mmdetection's ``norm_eval``: the model's own ``train()`` keeps every BatchNorm in
    eval (with frozen or trainable affine parameters, as in mmdet), so a plain
    ``model.train()`` still leaves them in eval on purpose."""

    def __init__(self, *args, norm_eval: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm_eval = norm_eval

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


class DropoutHeadNet(nn.Module):
    """A ``backbone`` and a trained ``head`` with a Dropout between two Linears
    (``head.1``): freezing the backbone leaves a mode-sensitive module outside the frozen
    part, whose input still requires grad."""

    def __init__(self, features: int = IN_FEATURES, hidden: int = 16, classes: int = N_CLASSES, p: float = 0.5):
        super().__init__()
        self.backbone = Backbone(features, hidden)
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.Dropout(p), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.head(self.backbone(x))

    def freeze_backbone(self) -> "DropoutHeadNet":
        self.backbone.requires_grad_(False)
        return self


class MCDropoutNet(nn.Module):
    """A model used for Monte-Carlo dropout: BatchNorm plus two Dropouts."""

    def __init__(self, features: int = IN_FEATURES, hidden: int = 16, classes: int = N_CLASSES):
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.drop1 = nn.Dropout(0.2)
        self.fc2 = nn.Linear(hidden, hidden)
        self.drop2 = nn.Dropout(0.2)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x):
        h = self.drop1(F.relu(self.bn(self.fc1(x))))
        return self.out(self.drop2(F.relu(self.fc2(h))))

    def enable_mc_dropout(self) -> "MCDropoutNet":
        """Root in eval, dropout modules switched back to train one by one."""
        self.eval()
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.train()
        return self


LATENT = 4


class Generator(nn.Module):
    def __init__(self, latent: int = LATENT, features: int = IN_FEATURES):
        super().__init__()
        self.fc1 = nn.Linear(latent, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, features)

    def forward(self, z):
        return self.fc2(F.relu(self.bn(self.fc1(z))))


class Discriminator(nn.Module):
    def __init__(self, features: int = IN_FEATURES):
        super().__init__()
        self.fc1 = nn.Linear(features, 16)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(16, 1)

    def forward(self, x):
        return self.fc2(self.drop(F.leaky_relu(self.fc1(x), 0.2)))


def gan(seed: int = 0):
    """A tiny (generator, discriminator) pair."""
    torch.manual_seed(seed)
    return Generator(), Discriminator()


class SiameseNet(nn.Module):
    """An embedding net applied to two or three inputs per step (siamese / triplet)."""

    def __init__(self, features: int = IN_FEATURES, dim: int = 8):
        super().__init__()
        self.fc = nn.Linear(features, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.1)
        self.emb = nn.Linear(16, dim)

    def forward(self, x):
        return self.emb(self.drop(F.relu(self.bn(self.fc(x)))))


def sgd(model: nn.Module, lr: float = 0.1) -> torch.optim.SGD:
    """SGD over the parameters that require grad (frozen ones are left out, as users do)."""
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor = None, y: torch.Tensor = None) -> float:
    """One ordinary classification step."""
    x = batch() if x is None else x
    y = labels(len(x)) if y is None else y
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


def validate(model: nn.Module, x: torch.Tensor = None) -> float:
    """The classic buggy validation: eval() and no_grad, and nothing switches back."""
    model.eval()
    with torch.no_grad():
        return model(batch(seed=1) if x is None else x).sum().item()
