"""observe/ranks.py: what a rank writes to the store, how it compares with its peers, and
that a store that fails turns the exchange off instead of raising or waiting. Two
"ranks" share an in-memory store in one process here; tests/test_rule_ranks_disagree.py
runs real ranks on gloo."""

import pytest
import torch
import torch.nn as nn

from modeguard._frames import Location
from modeguard.observe import ranks
from modeguard.observe.modes import ModeSite

NAMES = ("module.bn", "module.drop")
EVAL_SITE = ModeSite(False, "Net.eval()", Location("/x/train.py", 21, "validate"))
TRAIN_SITE = ModeSite(True, "Net.train()", Location("/x/train.py", 30, "main"))
TRAIN = ranks.Modes(NAMES, (True, True), (None, None))
EVAL = ranks.Modes(NAMES, (False, False), (EVAL_SITE, EVAL_SITE))
TRAIN_AGAIN = ranks.Modes(NAMES, (True, True), (TRAIN_SITE, TRAIN_SITE))


class MemoryStore:
    """The part of c10d's Store that the exchange uses, in memory; counts calls."""

    def __init__(self):
        self.data = {}
        self.ops = []

    def set(self, key, value):
        self.ops.append("set")
        self.data[key] = value.encode() if isinstance(value, str) else value

    def check(self, keys):
        self.ops.append("check")
        return all(k in self.data for k in keys)

    def get(self, key):
        self.ops.append("get")
        if key not in self.data:  # a real store would wait here: the exchange never asks
            raise AssertionError(f"get({key!r}) of a missing key would block")
        return self.data[key]

    def multi_get(self, keys):
        self.ops.append("multi_get")
        return [self.get(k) for k in keys]


class DeadStore:
    def __getattr__(self, name):
        def fail(*args):
            raise RuntimeError("Broken pipe")
        return fail


def pair(n=2):
    store = MemoryStore()
    return store, [ranks.RankExchange(store, "1/g/fp/1", r, range(n)) for r in range(n)]


def test_the_same_modes_at_the_same_steps_agree():
    _, (r0, r1) = pair()
    assert r0.share(1, TRAIN) == (None, True)  # rank 1 has not written step 1 yet
    assert r1.share(1, TRAIN) == (None, False)
    assert r0.recheck() == (None, False)
    # Different sites, same flags: still the same modes.
    assert r0.share(2, TRAIN_AGAIN)[0] is None and r1.share(2, TRAIN)[0] is None


def test_different_modes_at_the_same_step_are_found_on_both_sides():
    _, (r0, r1) = pair()
    r0.share(8, TRAIN)
    r1.share(8, TRAIN)
    found, behind = r0.share(16, EVAL)
    assert found is None and behind  # rank 1 has not reached step 16
    found, behind = r1.share(16, TRAIN)
    assert not behind
    assert found.step == 16 and found.rank == 1 and found.modules == [0, 1]
    assert found.mine == TRAIN and found.others == {0: EVAL}
    assert found.others[0].sites[0] == EVAL_SITE  # where rank 0 set it, read back from the store
    found, _ = r0.recheck()
    assert found.step == 16 and found.others[1].training == (True, True)
    assert r0.recheck() == (None, False)  # a step is compared once


def test_a_mode_change_at_the_same_step_on_every_rank_is_agreement():
    _, (r0, r1) = pair()
    for step, modes in ((1, TRAIN), (2, EVAL), (4, TRAIN)):
        assert r0.share(step, modes)[0] is None
        assert r1.share(step, modes)[0] is None


def test_steps_only_one_rank_looked_at_are_not_compared():
    _, (r0, r1) = pair()
    r0.share(4, EVAL)
    found, behind = r1.share(5, TRAIN)  # rank 1 looks at other steps (another schedule)
    assert found is None and behind  # rank 0 has not reached step 5
    r0.share(8, TRAIN)
    assert r1.share(8, TRAIN)[0] is None


def test_only_the_leader_reads_every_rank():
    store, (r0, r1, r2) = pair(3)
    assert r0.peers == [1, 2] and r1.peers == [0] and r2.peers == [0]
    for ex in (r0, r1, r2):
        ex.share(1, TRAIN)
    store.ops.clear()
    r2.share(2, EVAL)
    r1.share(2, TRAIN)
    assert store.ops == ["set", "check", "multi_get", "get", "set", "check", "multi_get", "get"]
    found, _ = r0.share(2, TRAIN)
    assert found.others == {2: EVAL} and found.modules == [0, 1]
    # The non-leaders see only the leader: rank 2 differs from it.
    assert r2.recheck()[0].others == {0: TRAIN}


def test_a_peer_that_never_wrote_is_not_waited_for():
    store, (r0, _) = pair()
    for step in (1, 2, 4):
        assert r0.share(step, TRAIN) == (None, True)
    assert "get" not in store.ops and "multi_get" not in store.ops


def test_a_store_that_fails_turns_the_exchange_off_without_raising():
    ex = ranks.RankExchange(DeadStore(), "k", 1, [0, 1])
    assert ex.share(1, TRAIN) == (None, False)
    assert ex.broken
    calls = ex.calls
    assert ex.share(2, EVAL) == (None, False) and ex.recheck() == (None, False)
    assert ex.calls == calls  # a dead store is not tried again


def test_another_models_history_under_the_same_key_is_not_compared():
    store, (r0, r1) = pair()
    other = ranks.Modes(("module.bn", "module.head.drop"), (False, False), (None, None))
    r0.share(1, other)
    assert r1.share(1, TRAIN) == (None, False)
    store.data[r1._key(0)] = b"not json"
    assert r1.share(2, TRAIN)[0] is None


def test_history_round_trips_and_stays_bounded():
    history = [(s, EVAL if s % 2 else TRAIN_AGAIN) for s in range(1, 12)]
    text = ranks.encode(0, history[-ranks.HISTORY:])
    assert ranks.decode(text, NAMES) == history[-ranks.HISTORY:]
    assert ranks.decode(text.encode(), ("a", "b")) is None
    ex = ranks.RankExchange(MemoryStore(), "k", 0, [0, 1])
    for step, modes in history:
        ex.share(step, modes)
    assert len(ex.history) == ranks.HISTORY


def test_modes_of_a_snapshot(mode_patches):
    from modeguard.observe.snapshot import ModeSnapshot

    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout(0.5))
    model[2].eval()
    modes = ranks.Modes.of(ModeSnapshot(model))
    assert modes.names == ("1", "2") and modes.training == (True, False)
    assert modes.sites[0] is None and modes.sites[1].how == "Dropout.eval()"


def test_only_ddp_and_fsdp_models_have_a_process_group():
    assert ranks.process_group_of(nn.Linear(2, 2)) is None
    assert not torch.distributed.is_initialized()
    assert ranks.exchange_for(object(), nn.Linear(2, 2)) is None


def test_likely_distributed_reads_world_size(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not ranks.likely_distributed()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert ranks.likely_distributed()
    for value in ("1", "two"):
        monkeypatch.setenv("WORLD_SIZE", value)
        assert not ranks.likely_distributed()


@pytest.mark.parametrize("site", [EVAL_SITE, ModeSite(True, "override", None, "Net"), None])
def test_sites_round_trip(site):
    assert ranks._site_from_dict(ranks._site_to_dict(site)) == site
