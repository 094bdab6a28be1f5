"""The models and the two timed operations: a training step and an evaluation forward.

Everything is written here (no torchvision) and makes its own random data. Sizes are
chosen so a CPU run finishes in minutes; on a GPU the same models run at larger batches,
plus a ResNet-50-sized CNN, in fp32 and under AMP (bf16 autocast, fp16 with GradScaler).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---- models ----------------------------------------------------------------------------

class MLP(nn.Module):
    """The worst case: so little arithmetic that Python overhead is most of the step."""

    def __init__(self, d_in=64, hidden=128, classes=10, p=0.1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(p),
            nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(p),
            nn.Linear(hidden, classes),
        )

    def forward(self, x):
        return self.net(x)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride=1):
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (3x3 stem) when ``small_input``, ImageNet-style stem otherwise.
    ``[2, 2, 2, 2]`` BasicBlocks is ResNet-18; ``[3, 4, 6, 3]`` Bottlenecks is ResNet-50."""

    def __init__(self, block, layers, width=64, classes=10, small_input=True, p=0.2):
        super().__init__()
        if small_input:
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
            )
        stages, cin = [], width
        for i, n in enumerate(layers):
            w = width * 2 ** i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, w, stride=2 if (i > 0 and j == 0) else 1))
                cin = w * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.drop = nn.Dropout(p)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(self.drop(x))


class TransformerClassifier(nn.Module):
    def __init__(self, vocab=1000, d_model=128, heads=4, layers=4, ff=256, p=0.1, classes=10):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout=p, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.drop = nn.Dropout(p)
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens):
        h = self.encoder(self.drop(self.embed(tokens)))
        return self.head(h.mean(1))


def deep_stack(blocks: int, width: int = 16, p: float = 0.1) -> nn.Module:
    """``blocks`` x (Linear + Dropout): 2 * blocks + 1 modules, for the scaling sweep."""
    layers = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.Dropout(p)]
    return nn.Sequential(*layers)


# ---- workloads -------------------------------------------------------------------------

@dataclass
class Workload:
    """A model with its optimizer, loss and a fixed batch; ``train_step`` and ``eval_forward``
    are what gets timed. ``amp`` is None, "bf16" or "fp16" (the latter with GradScaler)."""

    name: str
    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    device: str = "cpu"
    amp: Optional[str] = None
    lr: float = 0.01
    loss_fn: nn.Module = field(default_factory=nn.CrossEntropyLoss)
    #: A torch.compile backend: the steps call ``torch.compile(model)``, made before any
    #: instrument is installed (modeguard finds the wrapper of the model it watches).
    compile: Optional[str] = None

    def __post_init__(self):
        self.model.to(self.device)
        self.inputs = self.inputs.to(self.device)
        self.targets = self.targets.to(self.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=0.9)
        self.scaler = torch.amp.GradScaler(self.device) if self.amp == "fp16" else None
        self.call = torch.compile(self.model, backend=self.compile) if self.compile else self.model
        self.n_modules = sum(1 for _ in self.model.modules())
        self.n_params = sum(p.numel() for p in self.model.parameters())

    @property
    def label(self) -> str:
        return self.name if self.amp is None else f"{self.name} [{self.amp}]"

    @property
    def instrument_keys(self) -> Optional[tuple]:
        """The setups this workload is measured with (None: all). A compiled model only
        with modeguard's: per-module hooks would be compiled into its graphs."""
        return ("baseline", "again", "watch", "auto") if self.compile else None

    def autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(self.device, dtype=dtype)

    def train_step(self) -> None:
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.loss_fn(self.call(self.inputs), self.targets)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(opt)
            self.scaler.update()
        else:
            loss.backward()
            opt.step()

    def eval_forward(self) -> None:
        with torch.inference_mode(), self.autocast():
            self.call(self.inputs)

    def operation(self, phase: str) -> Callable[[], None]:
        return self.train_step if phase == "train" else self.eval_forward

    def set_phase(self, phase: str) -> None:
        self.model.train(phase == "train")


def _classification(name, model, x, classes, device, amp):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, classes, (x.shape[0],), generator=g)
    return Workload(name, model, x, y, device=device, amp=amp)


def cpu_workloads(quick: bool = False) -> list:
    """The CPU set. ``quick`` shrinks everything to a smoke test."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if quick:
        return [
            _classification("mlp", MLP(), torch.randn(16, 64, generator=g), 10, "cpu", None),
        ]
    return [
        _classification("mlp", MLP(), torch.randn(16, 64, generator=g), 10, "cpu", None),
        _classification("resnet18", ResNet(BasicBlock, [2, 2, 2, 2], width=16), torch.randn(2, 3, 32, 32, generator=g), 10, "cpu", None),
        _classification("transformer", TransformerClassifier(d_model=64, heads=4, layers=2, ff=128), torch.randint(0, 1000, (8, 32), generator=g), 10, "cpu", None),
        compiled_mlp(),
    ]


def compiled_mlp() -> "Workload":
    """The MLP under ``torch.compile`` (inductor): the row for a compiled model."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=g)
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(0))
    return Workload("mlp_compiled", MLP(), x, y, compile="inductor")


def gpu_workloads(device: str = "cuda", quick: bool = False) -> list:
    """The GPU set: every model in fp32, bf16 autocast and fp16 with GradScaler."""
    out = []
    amps = [None, "bf16", "fp16"]
    if not torch.cuda.is_bf16_supported():
        amps.remove("bf16")
    for amp in amps:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        out.append(_classification("mlp", MLP(), torch.randn(64, 64, generator=g), 10, device, amp))
        if quick:
            continue
        out.append(_classification("resnet18", ResNet(BasicBlock, [2, 2, 2, 2]), torch.randn(128, 3, 32, 32, generator=g), 10, device, amp))
        out.append(_classification("transformer", TransformerClassifier(d_model=512, heads=8, layers=6, ff=2048), torch.randint(0, 1000, (32, 256), generator=g), 10, device, amp))
        out.append(_classification("resnet50", ResNet(Bottleneck, [3, 4, 6, 3], classes=1000, small_input=False), torch.randn(64, 3, 224, 224, generator=g), 1000, device, amp))
    return out


def scaling_workload(blocks: int, width: int = 16, batch: int = 4, device: str = "cpu") -> Workload:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = deep_stack(blocks, width)
    x = torch.randn(batch, width, generator=g)
    y = torch.randint(0, width, (batch,), generator=g)
    return Workload(f"stack{blocks}", model, x, y, device=device)
