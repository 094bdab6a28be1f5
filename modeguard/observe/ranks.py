"""Sharing a watched model's modes with the other ranks of its process group (MG501).

The ranks that train one model under DistributedDataParallel (or FSDP) must train it in
the same modes. Each rank writes the modes it trained with under its own key in the
process group's c10d store, the key-value store every process group already has, and
reads the keys of the other ranks. Only calls that wait for no other rank are made:
``set``, ``check`` (do these keys exist?) and ``get``/``multi_get`` of keys that ``check``
found. So no rank ever waits for another, whatever steps they are at and whether they are
still alive. None of this runs on an ordinary step: the rule calls ``RankExchange.share``
on its poll schedule (``rules/ranks_disagree.py``).

A rank writes its recent history: ``(step, modes)`` at its last few polls, ``step``
counting the optimizer steps that brought the model new gradients (the same count on
every rank of a program that all ranks run alike), ``modes`` every mode-sensitive
module's flag and where it was set. Two ranks disagree when they trained the same step
in different modes. The group's lowest rank reads every other rank; the others read only
it, so a poll costs each rank three store round trips however many ranks there are.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import sys
import weakref
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .._frames import Location
from .modes import ModeSite
from .pickling import mark

#: Polls a rank keeps in what it writes: enough to cover the ranks' retries around one
#: scheduled poll (``rules/ranks_disagree.py``) and a few scheduled ones before it.
HISTORY = 8

#: Store keys live under this prefix, beside torch's own.
PREFIX = "modeguard/MG501/"


@dataclass(frozen=True)
class Modes:
    """The modes of a model's mode-sensitive modules under one snapshot."""

    names: Tuple[str, ...]
    training: Tuple[bool, ...]
    sites: Tuple[Optional[ModeSite], ...]

    @classmethod
    def of(cls, snapshot) -> "Modes":
        entries = snapshot.entries
        return cls(tuple(e.name for e in entries), tuple(e.training for e in entries), tuple(e.site for e in entries))

    @property
    def names_id(self) -> int:
        """Identifies the list of modules (ranks compare flags only for the same list)."""
        return zlib.crc32("\n".join(self.names).encode())


@dataclass
class Disagreement:
    """At ``step`` this rank trained with ``mine`` and the ranks in ``others`` with other
    modes; ``modules`` are the indices (into ``mine.names``) of the modules whose modes
    differ."""

    step: int
    rank: int
    mine: Modes
    others: Dict[int, Modes]
    modules: List[int] = field(default_factory=list)


def _site_to_dict(site: Optional[ModeSite]):
    return site.to_dict() if site is not None else None


def _site_from_dict(d) -> Optional[ModeSite]:
    if not d:
        return None
    loc = d.get("location")
    location = Location(loc["file"], int(loc["line"]), loc["function"]) if loc else None
    return ModeSite(bool(d["training"]), str(d["how"]), location, d.get("by"))


def encode(rank: int, history: Sequence[Tuple[int, Modes]]) -> str:
    """What a rank writes: its history, each distinct ``Modes`` and site written once."""
    modes_list: List[Modes] = []
    sites: List[Optional[ModeSite]] = []
    site_index: Dict[Optional[ModeSite], int] = {}
    steps = []
    for step, modes in history:
        if modes not in modes_list:
            modes_list.append(modes)
        steps.append([step, modes_list.index(modes)])
    packed = []
    for modes in modes_list:
        idx = []
        for site in modes.sites:
            if site not in site_index:
                site_index[site] = len(sites)
                sites.append(site)
            idx.append(site_index[site])
        packed.append(["".join("1" if t else "0" for t in modes.training), idx])
    names_id = history[-1][1].names_id if history else 0
    return json.dumps({"v": 1, "rank": rank, "id": names_id, "steps": steps, "modes": packed,
                       "sites": [_site_to_dict(s) for s in sites]}, separators=(",", ":"))


def decode(text, names: Tuple[str, ...]) -> Optional[List[Tuple[int, Modes]]]:
    """Another rank's history, read with this rank's module ``names`` (the same model has
    the same list); None when it is not this model's or not readable."""
    try:
        data = json.loads(text.decode() if isinstance(text, bytes) else text)
        if data.get("v") != 1 or data["id"] != zlib.crc32("\n".join(names).encode()):
            return None
        sites = [_site_from_dict(s) for s in data["sites"]]
        modes = []
        for bits, idx in data["modes"]:
            if len(bits) != len(names):
                return None
            modes.append(Modes(names, tuple(b == "1" for b in bits), tuple(sites[i] for i in idx)))
        return [(int(step), modes[i]) for step, i in data["steps"]]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


class RankExchange:
    """One watched model's modes, shared with the other ranks of its process group.

    ``store`` is any c10d ``Store``; ``ranks`` the global ranks of the group. A store call
    that fails (the group destroyed, the store's host gone) turns the exchange off for
    good: it never raises into the user's step and never retries a dead store."""

    def __init__(self, store, key: str, rank: int, ranks: Sequence[int]):
        self.store = store
        self.key = key
        self.rank = rank
        self.ranks = tuple(ranks)
        self.leader = min(self.ranks)
        others = [r for r in self.ranks if r != rank]
        # The leader reads everyone; the others read only the leader.
        self.peers = others if rank == self.leader else [self.leader]
        self.history: "collections.deque[Tuple[int, Modes]]" = collections.deque(maxlen=HISTORY)
        self.compared: Dict[int, int] = {}  # peer -> the latest step already compared with it
        self.calls = 0                      # store round trips so far (tests, and cost)
        self.broken = False

    def _key(self, rank: int) -> str:
        return f"{self.key}/{rank}"

    def share(self, step: int, modes: Modes) -> Tuple[Optional[Disagreement], bool]:
        """Write this rank's modes at ``step`` and compare with what its peers wrote.
        Returns the disagreement found (None if none), and whether some peer has not
        written ``step`` yet (then ``recheck`` one step later may still find it)."""
        if self.broken:
            return None, False
        if not self.history or self.history[-1][0] != step:
            self.history.append((step, modes))
        try:
            self.calls += 1
            self.store.set(self._key(self.rank), encode(self.rank, self.history))
            values = self._read()
        except Exception:  # the store is gone (a rank died, the group was destroyed)
            self.broken = True
            return None, False
        return self._compare(values)

    def recheck(self) -> Tuple[Optional[Disagreement], bool]:
        """Read the peers again, for the step shared last (nothing is written)."""
        if self.broken or not self.history:
            return None, False
        try:
            values = self._read()
        except Exception:
            self.broken = True
            return None, False
        return self._compare(values)

    def _read(self) -> List[Optional[bytes]]:
        keys = [self._key(r) for r in self.peers]
        self.calls += 1
        if self.store.check(keys):  # all there: the common case after the first polls
            self.calls += 1
            multi_get = getattr(self.store, "multi_get", None)
            if multi_get is not None:
                return list(multi_get(keys))
            self.calls += len(keys) - 1
            return [self.store.get(k) for k in keys]
        values = []
        for k in keys:  # some rank has not written yet: read the ones that have
            self.calls += 1
            if self.store.check([k]):
                self.calls += 1
                values.append(self.store.get(k))
            else:
                values.append(None)
        return values

    def _compare(self, values) -> Tuple[Optional[Disagreement], bool]:
        mine = dict(self.history)
        step, modes = self.history[-1]
        behind = False
        found: Dict[int, Dict[int, Modes]] = {}  # step -> rank -> its modes there
        for peer, value in zip(self.peers, values):
            history = decode(value, modes.names) if value is not None else None
            if not history:
                behind = behind or value is None
                continue
            if max(s for s, _ in history) < step:
                behind = True
            done = self.compared.get(peer, 0)
            for s, theirs in history:
                if s <= done or s not in mine:
                    continue
                self.compared[peer] = max(self.compared.get(peer, 0), s)
                if theirs.training != mine[s].training:
                    found.setdefault(s, {})[peer] = theirs
        if not found:
            return None, behind
        s = max(found)
        others = found[s]
        own = mine[s]
        differing = [i for i in range(len(own.names)) if any(m.training[i] != own.training[i] for m in others.values())]
        return Disagreement(s, self.rank, own, others, differing), behind


# ---- which models are compared, and under which key -------------------------------------

#: Guard -> its number among the guards of this process that shared modes, and its
#: models' keys so far. Ranks that run alike number their guards and models alike.
_GUARD_KEYS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_GUARD_NUMBERS = itertools.count(1)


def likely_distributed() -> bool:
    """Is this process one rank of several, or about to be (torchrun's ``WORLD_SIZE``)?
    Asked once per guard, to decide how soon the rule first looks."""
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return True
    except ValueError:
        pass
    dist = sys.modules.get("torch.distributed")
    try:
        return bool(dist is not None and dist.is_available() and dist.is_initialized())
    except Exception:  # pragma: no cover - a broken build: not distributed
        return False


def process_group_of(module: nn.Module):
    """The process group whose ranks hold replicas of ``module``: a DistributedDataParallel
    or FullyShardedDataParallel (FSDP1) wrapper's own, the world for a module that
    ``fully_shard`` (FSDP2) sharded; None for any other module."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return module.process_group
    fsdp = sys.modules.get("torch.distributed.fsdp")  # never imported here: FSDP1 needs it loaded
    wrapper = getattr(fsdp, "FullyShardedDataParallel", None) if fsdp is not None else None
    if wrapper is not None and isinstance(module, wrapper):
        return module.process_group
    sharded = getattr(fsdp, "FSDPModule", None) if fsdp is not None else None
    if sharded is not None and isinstance(module, sharded):
        # FSDP2 (fully_shard): every rank of the mesh holds a shard of the same model, so
        # the whole world trains it (HSDP's replicas included).
        return torch.distributed.group.WORLD
    return None


def _fingerprint(module: nn.Module) -> str:
    """The same on every rank for replicas of one model: its class and parameter shapes."""
    text = type(module).__name__ + ";" + ";".join(f"{n}:{tuple(p.shape)}" for n, p in module.named_parameters())
    return f"{zlib.crc32(text.encode()):08x}"


class WrapperProbe:
    """Which DDP wrapper runs a model watched on its own (``watch(model)`` before or after
    ``DDP(model)``): a forward pre-hook on the model asks DDP which wrapper's forward is
    running (``DistributedDataParallel._get_active_ddp_module``, DDP's own record of it
    for torch.compile). Placed at the rule's first look, removed at its next one, which
    runs in an optimizer step, never inside a forward."""

    def __init__(self, module: nn.Module, handles: list):
        self.found = None
        self._handles = handles
        active_wrapper = nn.parallel.DistributedDataParallel._get_active_ddp_module
        is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)

        def modeguard_ddp_probe(mod, args):
            if self.found is None and not is_compiling():
                wrapper = active_wrapper()
                if wrapper is not None and wrapper.module is mod:
                    self.found = weakref.ref(wrapper)

        self.handle = module.register_forward_pre_hook(mark(modeguard_ddp_probe))
        handles.append(self.handle)  # removed with the model's other hooks by unwatch()

    @staticmethod
    def possible(module: nn.Module) -> bool:
        dist = torch.distributed
        try:
            initialized = dist.is_available() and dist.is_initialized()
        except Exception:
            return False
        return (initialized and process_group_of(module) is None
                and hasattr(nn.parallel.DistributedDataParallel, "_get_active_ddp_module"))

    def finish(self) -> Optional[nn.Module]:
        """Remove the hook; the wrapper seen, if any."""
        self.handle.remove()
        if self.handle in self._handles:
            self._handles.remove(self.handle)
        return self.found() if self.found is not None else None


def exchange_for(guard, module: nn.Module, wrapper: Optional[nn.Module] = None) -> Optional[RankExchange]:
    """The exchange for a watched model whose replicas other ranks train, or None (not a
    DDP/FSDP model, a group of one rank, torch.distributed not initialized). ``wrapper``
    is the DDP that runs ``module``, when the model itself is watched (``WrapperProbe``)."""
    dist = torch.distributed
    try:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = process_group_of(wrapper if wrapper is not None else module)
        if group is None:
            return None
        ranks = sorted(dist.get_process_group_ranks(group))
        rank = dist.get_rank()
        if len(ranks) < 2 or rank not in ranks:
            return None
        # Private, and stable since torch 1.x; without it there is nothing to compare.
        store = dist.PrefixStore(PREFIX, dist.distributed_c10d._get_default_store())
    except Exception:
        return None
    number, counts = _GUARD_KEYS.setdefault(guard, (next(_GUARD_NUMBERS), {}))
    fp = _fingerprint(module)
    counts[fp] = counts.get(fp, 0) + 1
    group_id = f"{zlib.crc32(','.join(map(str, ranks)).encode()):08x}"
    return RankExchange(store, f"{number}/{group_id}/{fp}/{counts[fp]}", rank, ranks)
