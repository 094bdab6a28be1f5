"""Two-rank DDP programs on gloo (CPU), for tests/test_distributed.py.

    python ddp_ranks.py RANK WORLD_SIZE PORT OUT_DIR

runs every scenario below in one process (one torch import for all of them), each
under its own ``modeguard.watch(..., on_violation="record")``, and writes what each
found to OUT_DIR/rank<RANK>.json after each scenario. The last scenario ends rank 0
abruptly, so rank 1 goes on with the store's host gone.
"""

import json
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

import modeguard
from modeguard.rules.ranks_disagree import EVERY, RETRIES, next_look

STEPS_PER_EPOCH = 8


class Net(nn.Module):
    def __init__(self, aux=False):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(16, 2)
        # A head used on some steps only (find_unused_parameters=True).
        self.aux = nn.Linear(16, 2) if aux else None

    def forward(self, x, use_aux=False):
        h = self.drop(F.relu(self.bn(self.fc1(x))))
        return self.fc2(h) + (self.aux(h) if use_aux else 0)


def batches(rank, n):
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(16, 8, generator=g), torch.randint(0, 2, (16,), generator=g)) for _ in range(n)]


def validate(model, x):
    model.eval()  # VALIDATE-EVAL-LINE
    with torch.no_grad():
        model(x)


def found(guard):
    return [
        {"code": v.code, "model": v.model, "modules": v.modules, "headline": v.headline,
         "mode_set_at": v.mode_set_at.to_dict() if v.mode_set_at else None, "count": v.count}
        for v in guard.violations
    ]


def exchange_of(guard, ddp):
    st = guard.root_state(ddp).rule_state.get("MG501")
    return st.exchange if st is not None else None


def train(rank, ddp, opt, data, epochs, validate_on, accumulate=1, aux_every=0, on_step=None):
    """Epochs of training; ``validate_on(rank)`` says whether this rank validates after
    each epoch (and then puts the model back in train mode unless it is the bug)."""
    step = 0
    ddp.train()
    for epoch in range(epochs):
        for i in range(STEPS_PER_EPOCH):
            opt.zero_grad()
            for k in range(accumulate):
                x, y = data[(i * accumulate + k) % len(data)]
                use_aux = bool(aux_every) and i % aux_every == 0
                last = k == accumulate - 1
                if last:
                    F.cross_entropy(ddp(x, use_aux), y).backward()
                else:
                    with ddp.no_sync():  # gradient accumulation: no allreduce until the last
                        F.cross_entropy(ddp(x, use_aux), y).backward()
            opt.step()
            step += 1
            if on_step is not None:
                on_step(step)
        validate_on(rank, ddp.module, data[0][0])


def scenario_clean(rank):
    """Every rank validates and goes back to train mode. Also records on which steps
    MG501 talked to the store, and Python calls per step between two of its looks."""
    model = Net()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    guard = modeguard.watch(ddp, opt, on_violation="record")
    store_steps = []
    last = [0]

    def on_step(step):
        ex = exchange_of(guard, ddp)
        calls = ex.calls if ex is not None else 0
        if calls != last[0]:
            store_steps.append(step)
            last[0] = calls

    data = batches(rank, 8)
    train(rank, ddp, opt, data, 8, lambda r, m, x: (validate(m, x), m.train()), on_step=on_step)
    out = {"violations": found(guard), "store_steps": store_steps}
    guard.unwatch()
    out["calls_per_step"] = {"on": calls_between_looks(rank, "error"), "off": calls_between_looks(rank, "off")}
    return out


def calls_between_looks(rank, mg501):
    """Python function calls of training steps 41..60 (no scheduled look of MG501's,
    nor of any other rule, falls there), with MG501 on or off."""
    model = Net()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    data = batches(rank, 4)
    calls = [0]

    def profile(frame, event, arg):
        if event == "call":
            calls[0] += 1

    with modeguard.watch(ddp, opt, on_violation="record", rules={"MG501": mg501}):
        for step in range(1, 61):
            x, y = data[step % 4]
            if step == 41:
                sys.setprofile(profile)
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
        sys.setprofile(None)
    return calls[0]


def scenario_rank0_validates(rank):
    """The classic bug: only rank 0 validates, and nothing puts it back in train mode."""
    model = Net()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    with modeguard.watch(ddp, opt, on_violation="record") as guard:
        train(rank, ddp, opt, batches(rank, 8), 4, lambda r, m, x: validate(m, x) if r == 0 else None)
        return {"violations": found(guard)}


def scenario_model_watched_inside_ddp(rank):
    """The same bug with the model itself watched, and wrapped in DDP afterwards."""
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        ddp = DDP(model)
        train(rank, ddp, opt, batches(rank, 8), 3, lambda r, m, x: validate(m, x) if r == 0 else None)
        return {"violations": found(guard)}


def scenario_fsdp_rank0_trains(rank):
    """FSDP (FullyShardedDataParallel): every rank validates (its forward is a collective),
    and only rank 0 puts the model back in train mode."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = Net()
    fsdp = FSDP(model, device_id=torch.device("cpu"))
    opt = torch.optim.SGD(fsdp.parameters(), lr=0.05)
    with modeguard.watch(fsdp, opt, on_violation="record") as guard:
        data = batches(rank, 8)
        fsdp.train()
        for step in range(1, 25):
            x, y = data[step % 8]
            opt.zero_grad()
            F.cross_entropy(fsdp(x), y).backward()
            opt.step()
            if step % 8 == 0:
                fsdp.eval()
                with torch.no_grad():
                    fsdp(data[0][0])
                if rank == 0:
                    fsdp.train()
        return {"violations": found(guard)}


class NormNet(nn.Module):
    """LayerNorm and Dropout: its only mode-sensitive module has no parameters."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.drop, self.fc2 = nn.Linear(8, 16), nn.LayerNorm(16), nn.Dropout(0.3), nn.Linear(16, 2)

    def forward(self, x):
        return self.fc2(self.drop(F.relu(self.norm(self.fc1(x)))))


def _fsdp2(rank, back_to_train):
    """FSDP2 (fully_shard): every rank validates (its forward all-gathers), and
    ``back_to_train(rank)`` says which ranks call train() again. Also counts how often
    modeguard's snapshot had to be rebuilt per step (fully_shard swaps parameters in and
    out of every module around each forward)."""
    from torch.distributed.fsdp import fully_shard

    from modeguard.observe import modes

    model = NormNet()
    fully_shard(model.fc1)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        data = batches(rank, 8)
        model.train()
        x, y = data[1]
        F.cross_entropy(model(x), y).backward()  # the first step, before counting
        opt.step()
        rebuilds_before = modes.STRUCTURE_EPOCH[0]
        for step in range(2, 25):
            x, y = data[step % 8]
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if step % 8 == 0:
                model.eval()
                with torch.no_grad():
                    model(data[0][0])
                if back_to_train(rank):
                    model.train()
        return {"violations": found(guard), "structure_changes": modes.STRUCTURE_EPOCH[0] - rebuilds_before}


def scenario_fsdp2_clean(rank):
    return _fsdp2(rank, lambda r: True)


def scenario_fsdp2_zombie_eval(rank):
    """Only rank 0 puts the model back in train mode: rank 1 trains with Dropout off."""
    return _fsdp2(rank, lambda r: r == 0)


def scenario_no_sync(rank):
    """Gradient accumulation over 4 micro-batches with no_sync(), every rank validating."""
    model = Net()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    with modeguard.watch(ddp, opt, on_violation="record") as guard:
        train(rank, ddp, opt, batches(rank, 8), 3, lambda r, m, x: (validate(m, x), m.train()), accumulate=4)
        return {"violations": found(guard)}


def scenario_find_unused(rank):
    """find_unused_parameters=True with a head used on some steps, and a comm hook."""
    model = Net(aux=True)
    ddp = DDP(model, find_unused_parameters=True)
    ddp.register_comm_hook(state=None, hook=default_hooks.allreduce_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    with modeguard.watch(ddp, opt, on_violation="record") as guard:
        train(rank, ddp, opt, batches(rank, 8), 3, lambda r, m, x: (validate(m, x), m.train()), aux_every=2)
        return {"violations": found(guard)}


def scenario_unwrapped(rank):
    """Each rank trains a model of its own, not wrapped in DDP; rank 1 keeps its frozen
    BatchNorm in eval on purpose, rank 0 trains all of it."""
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with modeguard.watch(model, opt, on_violation="record") as guard:
        data = batches(rank, 8)
        for step in range(24):
            model.train()
            if rank == 1:
                model.bn.requires_grad_(False)
                model.bn.eval()
            x, y = data[step % 8]
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return {"violations": found(guard), "mg501_looked": "MG501" in guard.root_state(model).rule_state}


def scenario_uneven(rank):
    """Rank 0 takes 50 steps more than rank 1 (no_sync, so no collective waits), while rank
    1 waits at a barrier: rank 0's looks must not wait for rank 1."""
    model = Net()
    ddp = DDP(model, broadcast_buffers=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    with modeguard.watch(ddp, opt, on_violation="record") as guard:
        data = batches(rank, 8)
        ddp.train()
        for step in range(16 + (50 if rank == 0 else 0)):
            x, y = data[step % 8]
            opt.zero_grad()
            if step < 16:
                F.cross_entropy(ddp(x), y).backward()
            else:
                with ddp.no_sync():
                    F.cross_entropy(ddp(x), y).backward()
            opt.step()
        ex = exchange_of(guard, ddp)
        out = {"violations": found(guard), "store_calls": ex.calls, "steps": step + 1}
    dist.barrier()
    return out


def scenario_store_host_dies(rank, write):
    """Rank 0 (the store's host) ends abruptly after 8 common steps; rank 1 trains 60
    more steps on its own (no_sync, no collective) and must neither raise nor wait."""
    model = Net()
    ddp = DDP(model, broadcast_buffers=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    with modeguard.watch(ddp, opt, on_violation="record") as guard:
        data = batches(rank, 8)
        ddp.train()
        for step in range(8):
            x, y = data[step % 8]
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
        dist.barrier()
        if rank == 0:
            write({"ended": True})
            os._exit(0)
        for step in range(60):
            x, y = data[step % 8]
            opt.zero_grad()
            with ddp.no_sync():
                F.cross_entropy(ddp(x), y).backward()
            opt.step()
        ex = exchange_of(guard, ddp)
        return {"violations": found(guard), "broken": ex.broken}


def main():
    rank, world, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    # torch 2.13 renames it; the old name still says "do not sync buffers at all".
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed.fsdp")
    torch.manual_seed(0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {"schedule": {"every": EVERY, "retries": RETRIES}}
    path = os.path.join(out_dir, f"rank{rank}.json")

    def write(extra=None):
        if extra:
            results.update(extra)
        with open(path + ".tmp", "w") as fh:
            json.dump(results, fh)
        os.replace(path + ".tmp", path)

    for name, fn in [("clean", scenario_clean), ("rank0_validates", scenario_rank0_validates),
                     ("model_watched_inside_ddp", scenario_model_watched_inside_ddp),
                     ("fsdp_rank0_trains", scenario_fsdp_rank0_trains),
                     ("fsdp2_clean", scenario_fsdp2_clean), ("fsdp2_zombie_eval", scenario_fsdp2_zombie_eval),
                     ("no_sync", scenario_no_sync), ("find_unused", scenario_find_unused),
                     ("unwrapped", scenario_unwrapped), ("uneven", scenario_uneven)]:
        results[name] = fn(rank)
        write()
    results["store_host_dies"] = scenario_store_host_dies(rank, write)
    write()
    assert next_look  # the schedule the test checks store_steps against
    os._exit(0)  # rank 0 is gone: no destroy_process_group, which would wait for it


if __name__ == "__main__":
    main()
