"""The classic DDP bug, as torchrun runs it: only rank 0 validates, and nothing puts its
model back in train mode. Launched by tests/test_distributed.py with
`modeguard run -m torch.distributed.run --nproc_per_node=2 ddp_train.py`."""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP


def validate(model, x):
    model.eval()  # MODE-SET-LINE
    with torch.no_grad():
        return model(x).argmax(1)


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 2, (64,), generator=g)
    ddp.train()
    for epoch in range(4):
        for i in range(0, 64, 16):
            opt.zero_grad()
            F.cross_entropy(ddp(x[i:i + 16]), y[i:i + 16]).backward()
            opt.step()  # STEP-LINE
        if rank == 0:
            validate(model, x)
    dist.destroy_process_group()
    print(f"rank {rank} trained")


if __name__ == "__main__":
    main()
