"""The bundled demo: a small training loop with the classic bug.

``validate()`` calls ``model.eval()`` and nothing calls ``model.train()`` again, so from
the second epoch on the model trains with dropout off and BatchNorm frozen. It also
evaluates without ``torch.no_grad()``. Run it with ``modeguard demo`` or ``make demo``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Classifier(nn.Module):
    def __init__(self, n_in: int = 20, hidden: int = 64, n_out: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(hidden, n_out)

    def forward(self, x):
        return self.fc2(self.drop(F.relu(self.bn1(self.fc1(x)))))


def make_data(n: int = 512, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    return x, y


def validate(model, x, y) -> float:
    model.eval()                      # <- switched to eval ...
    correct = 0
    for i in range(0, len(x), 128):   # ... and no torch.no_grad(): graphs built for nothing
        correct += (model(x[i:i + 128]).argmax(1) == y[i:i + 128]).sum().item()
    return correct / len(x)           # ... and nothing switches back to train


def train(epochs: int = 3, batch: int = 32):
    torch.manual_seed(0)
    x, y = make_data()
    xv, yv = make_data(256, seed=1)
    model = Classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for epoch in range(epochs):
        for i in range(0, len(x), batch):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[i:i + batch]), y[i:i + batch])
            loss.backward()
            optimizer.step()
        acc = validate(model, xv, yv)
        print(f"epoch {epoch}: loss {loss.item():.3f}  val acc {acc:.2f}")
    return model


def main() -> int:
    """Run the demo under automatic watching and print the report."""
    from . import _auto as auto

    print("Training a small classifier whose validate() forgets model.train() ...\n")
    guard = auto.start(on_violation="record")
    try:
        train()
    finally:
        auto.stop()
    print()
    from .report.render import print_report

    print_report(guard.report())
    print("\nFix: call model.train() after validate(), and evaluate under torch.no_grad().")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
