"""Only a warning: evaluation under no_grad, but model.eval() is forgotten (MG201)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
for i in range(0, 32, 8):
    opt.zero_grad()
    F.cross_entropy(model(x[i:i + 8]), y[i:i + 8]).backward()
    opt.step()
with torch.no_grad():
    for i in range(0, 32, 8):
        model(x[i:i + 8])  # EVAL-LINE
print("done")
