"""Run as `-m mgrun_pkg.train`: a relative import, and the bug of training in eval mode."""

import sys

import torch

from .helpers import make_model

if __name__ == "__main__":
    print("module argv=" + repr(sys.argv[1:]))
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.eval()
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
