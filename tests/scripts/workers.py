"""DataLoader workers (fork and spawn) with a Dataset defined in this script."""

import pickle
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset


class Squares(Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        x = torch.full((4,), float(i))
        return x, int(i % 2)


def main(context):
    # A class of the script pickles as __main__.Squares, as under plain python.
    assert type(pickle.loads(pickle.dumps(Squares()))) is Squares
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = DataLoader(Squares(), batch_size=8, num_workers=2, multiprocessing_context=context)
    seen = 0
    model.train()
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        seen += len(x)
    print(f"{context}: {seen} samples")


if __name__ == "__main__":
    for context in sys.argv[1:] or ["fork"]:
        main(context)
