"""MG501 ranks-disagree: the ranks of a DDP (or FSDP) model train it in different modes.

The rule looks only on its poll schedule (``Rule.on_poll``), never on an ordinary step:
at the steps 1, 2, 4, ..., 64 and then every 64 steps that bring a DDP model new
gradients, plus a look one step later while another rank has not caught up, each rank
shares its modes through the process group's store (``observe/ranks.py``).
"""

from __future__ import annotations

from typing import List, Optional

from .._config import Severity
from ..observe import ranks
from ._base import Rule

#: Scheduled looks double up to this many steps apart, then stay this far apart: the
#: bound on how long a disagreement goes unreported. It must not exceed any other poll
#: rule's interval (MG301's is at least 64), so that the guard polls this rule exactly
#: when it asks to and every rank counts the same steps (a test checks this).
EVERY = 64
#: Looks, one step apart, while a peer has not written the step just shared.
RETRIES = 2
#: "Do not poll me": the interval for models that are not compared.
NEVER = 1 << 30


def next_look(step: int) -> int:
    """Steps from ``step`` to the next scheduled look: 1, 2, 4, ..., 64, 128, 192, ..."""
    if step < EVERY:
        nxt = 1
        while nxt <= step:
            nxt *= 2
        return nxt - step
    return EVERY - step % EVERY


class _ModelState:
    """What MG501 keeps per watched model (``RootState.rule_state["MG501"]``)."""

    __slots__ = ("exchange", "probe", "step", "interval", "due", "retries", "modes", "snapshot")

    def __init__(self, exchange, step):
        self.exchange = exchange
        self.probe = None       # ranks.WrapperProbe, between the first two looks
        self.step = step        # steps with new gradients so far, at this look
        self.interval = 0       # what the previous look asked for
        self.due = step         # the next scheduled look
        self.retries = 0        # looks again, one step apart, since the last scheduled one
        self.modes = None       # ranks.Modes of ``snapshot`` (built once per snapshot)
        self.snapshot = None


class RanksDisagree(Rule):
    code = "MG501"
    name = "ranks-disagree"
    severity = Severity.ERROR
    summary = "the ranks of a DistributedDataParallel (or FSDP) model train it with different modes."
    explanation = """
        Under DistributedDataParallel every rank holds a replica of one model and the
        gradients of all replicas are averaged at every step, which assumes they compute
        the same function. When one rank trains with Dropout off or BatchNorm frozen and the
        others in train mode, the averaged update mixes two different networks, BatchNorm's
        running statistics drift apart between ranks, and the checkpoint rank 0 saves is not
        the model the other ranks trained. The usual cause is validation on one rank only
        (`if rank == 0: validate(model)`) that calls model.eval() and never model.train().
        Each rank shares its modes through the process group's store, at steps 1, 2, 4, ...,
        64 and then every 64 steps, without ever waiting for another rank.
    """
    quiet_when = [
        "every rank trains the model with the same modes, also with no_sync() gradient accumulation, find_unused_parameters=True and communication hooks",
        "the model is not wrapped in DistributedDataParallel or FullyShardedDataParallel, nor sharded with fully_shard (ranks may train different models on purpose)",
        "the process group has one rank, or torch.distributed is not initialized",
    ]
    fix = "put the model in the same mode on every rank: call model.train() after validate() on every rank, or validate on every rank."

    @property
    def poll_interval(self):
        # Asked once per guard: look at the first step only where there are ranks to ask.
        return 1 if ranks.likely_distributed() else NEVER

    def on_poll(self, guard, root, snapshot):
        state = root.rule_state.get(self.code)
        if state is None:
            module = root.ref()
            exchange = ranks.exchange_for(guard, module) if module is not None else None
            # This first look comes after the guard's first poll interval.
            state = root.rule_state[self.code] = _ModelState(exchange, guard.poll_interval)
            if exchange is None and root.hooked and ranks.WrapperProbe.possible(module):
                # watch(model) with DDP(model) around it: learn the wrapper from the
                # forwards until the next step.
                state.probe = ranks.WrapperProbe(module, root.handles)
                state.due = state.step + 1
                state.interval = 1
                return 1
        elif state.exchange is None and state.probe is None:
            # A model that is not a DDP/FSDP wrapper, nor run by one, never becomes one.
            return NEVER
        else:
            # Polled exactly when asked (EVERY is no more than any other poll rule's).
            state.step += state.interval
        if state.probe is not None:
            wrapper, state.probe = state.probe.finish(), None
            module = root.ref()
            if wrapper is not None and module is not None:
                state.exchange = ranks.exchange_for(guard, module, wrapper)
        if state.exchange is None:
            return NEVER
        return self._look(guard, root, snapshot, state)

    def _look(self, guard, root, snapshot, state) -> int:
        exchange = state.exchange
        if state.step >= state.due:
            if state.snapshot is not snapshot:
                state.snapshot, state.modes = snapshot, ranks.Modes.of(snapshot)
            found, behind = exchange.share(state.step, state.modes)
            state.due = state.step + next_look(state.step)
            state.retries = 0
        else:  # a peer had not caught up with the step shared last: read it again
            found, behind = exchange.recheck()
        if behind and state.retries < RETRIES:
            state.retries += 1
            state.interval = 1
        else:
            state.interval = state.due - state.step
        if found is not None:
            self._report(guard, root, found)
        return state.interval

    def _report(self, guard, root, found: "ranks.Disagreement") -> None:
        mine = found.mine
        idx = found.modules
        groups = {}  # modes of the differing modules -> ranks
        groups.setdefault(tuple(mine.training[i] for i in idx), []).append(found.rank)
        sites = {found.rank: mine}
        for r, modes in sorted(found.others.items()):
            groups.setdefault(tuple(modes.training[i] for i in idx), []).append(r)
            sites[r] = modes
        parts = []
        for flags, rs in groups.items():
            who = _ranks_text(rs, found.rank)
            parts.append(f"{who}: {_modules_text(sites[rs[0]], idx)}")
        headline = (
            f"the ranks train this model with different modes (at step {found.step}), so the gradients "
            f"averaged across them come from replicas that compute different functions: " + "; ".join(parts)
        )
        site = next((mine.sites[i] for i in idx if mine.sites[i] is not None), None)
        guard.emit(self, severity=None, root=root, where=None, modules=[mine.names[i] for i in idx],
                   mode_site=site, headline=headline, allowed=None)


def _ranks_text(rs: List[int], me: int) -> str:
    listed = ", ".join(f"{r} (this rank)" if r == me else str(r) for r in sorted(rs))
    return f"rank {listed}" if len(rs) == 1 else f"ranks {listed}"


def _site_text(site) -> str:
    if site is None:
        return "never switched"
    where = site.location.short() if site.location is not None else "an unknown place"
    if site.how == "override":
        return f"by {site.by}.train() (an override) at {where}"
    if site.how == "assignment":
        return f"`.training = {site.training}` at {where}"
    return f"{site.how} at {where}"


def _modules_text(modes: "ranks.Modes", idx: List[int], limit: int = 4) -> str:
    """``module.bn, module.drop in eval (Net.eval() at train.py:21)``, grouped by mode and
    by where it was set."""
    groups: dict = {}
    for i in idx:
        groups.setdefault((modes.training[i], _site_text(modes.sites[i])), []).append(modes.names[i])
    out = []
    for (training, site), names in groups.items():
        shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
        out.append(f"{shown} in {'train' if training else 'eval'} ({site})")
    return ", ".join(out)
