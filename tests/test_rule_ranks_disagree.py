"""MG501 ranks-disagree: two real ranks on gloo over 127.0.0.1 (tests/scripts/ddp_ranks.py,
one launch of two processes for every scenario, with a timeout so that a hang fails the
test instead of the suite). Fires on the classic bug (only rank 0 validates); quiet when
the ranks agree, with no_sync() accumulation, with find_unused_parameters=True and a comm
hook, and for models that are not wrapped in DDP; never waits for a rank that is behind
or gone, and talks to the store only at its scheduled looks."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from modeguard import Severity
from modeguard.rules import RULES, ranks_disagree
from modeguard.rules._base import overrides

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "scripts", "ddp_ranks.py")
#: Both ranks, every scenario: a torch import and well under a minute of training each.
TIMEOUT_S = 240


def _line_of(path, marker):
    with open(path) as fh:
        return next(n for n, line in enumerate(fh, 1) if marker in line)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """{rank: {scenario: result}} from one run of the two ranks."""
    out = tmp_path_factory.mktemp("ranks")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("MODEGUARD", "MODEGUARD_RULES", "MODEGUARD_BACKWARD_SAMPLE", "RANK", "WORLD_SIZE"):
        env.pop(name, None)
    port = _free_port()
    procs = [
        subprocess.Popen([sys.executable, SCRIPT, str(r), "2", str(port), str(out)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    deadline = time.monotonic() + TIMEOUT_S
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the two ranks did not finish within {TIMEOUT_S} s: something waits for another rank")
    for r, (p, (_, err)) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{err[-4000:]}"
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in range(2)}


def codes(result):
    return sorted(v["code"] for v in result["violations"])


# ---- fires -----------------------------------------------------------------------------


def test_rank0_only_validation_reports_mg101_on_rank0_and_mg501_on_both(ranks):
    eval_line = _line_of(SCRIPT, "VALIDATE-EVAL-LINE")
    zero, one = ranks[0]["rank0_validates"], ranks[1]["rank0_validates"]
    assert codes(zero) == ["MG101", "MG501"]
    assert codes(one) == ["MG501"]
    (mg501,) = [v for v in zero["violations"] if v["code"] == "MG501"]
    assert mg501["model"] == "DistributedDataParallel (rank 0)"
    assert mg501["modules"] == ["module.bn", "module.drop"]
    # Rank 0 validated after step 8, and the first look after that is at step 16.
    assert "(at step 16)" in mg501["headline"]
    assert (f"rank 0 (this rank): module.bn, module.drop in eval (Net.eval() at ddp_ranks.py:{eval_line})"
            in mg501["headline"])
    assert "rank 1: module.bn, module.drop in train (never switched)" in mg501["headline"]
    assert mg501["mode_set_at"]["location"]["line"] == eval_line
    # The look at step 16 saw it; the one at step 32, the scenario's last, sees it only if
    # the other rank has written that step by then (nothing waits for it: no later step
    # is left to look again).
    assert mg501["count"] in (1, 2)
    (other,) = one["violations"]
    assert other["model"] == "DistributedDataParallel (rank 1)"
    assert other["modules"] == ["module.bn", "module.drop"]
    assert f"rank 0: module.bn, module.drop in eval (Net.eval() at ddp_ranks.py:{eval_line})" in other["headline"]


def test_a_model_watched_before_ddp_wraps_it_is_compared_too(ranks):
    # watch(model) and then DDP(model): the rule learns the wrapper from a forward.
    zero, one = ranks[0]["model_watched_inside_ddp"], ranks[1]["model_watched_inside_ddp"]
    assert codes(zero) == ["MG101", "MG501"] and codes(one) == ["MG501"]
    for r, result in ((0, zero), (1, one)):
        (mg501,) = [v for v in result["violations"] if v["code"] == "MG501"]
        assert mg501["model"] == f"Net (rank {r})" and mg501["modules"] == ["bn", "drop"]
        assert "(at step 16)" in mg501["headline"]


def test_fsdp_ranks_that_disagree_are_reported(ranks):
    # Every rank validates, and only rank 0 calls train() again: rank 1 trains in eval.
    zero, one = ranks[0]["fsdp_rank0_trains"], ranks[1]["fsdp_rank0_trains"]
    assert codes(zero) == ["MG501"] and codes(one) == ["MG101", "MG501"]
    (mg501,) = [v for v in one["violations"] if v["code"] == "MG501"]
    assert mg501["model"] == "FullyShardedDataParallel (rank 1)"
    assert mg501["modules"] == ["_fsdp_wrapped_module.bn", "_fsdp_wrapped_module.drop"]
    assert "rank 1 (this rank): _fsdp_wrapped_module.bn, _fsdp_wrapped_module.drop in eval" in mg501["headline"]
    assert "rank 0: _fsdp_wrapped_module.bn, _fsdp_wrapped_module.drop in train" in mg501["headline"]


def test_fsdp2_rank_left_in_eval_is_mg101_there_and_mg501(ranks):
    # fully_shard, LayerNorm + Dropout: every rank validates, only rank 0 calls train()
    # again. Rank 1 trains with its Dropout in eval (MG101, as the same model under DDP),
    # and the ranks disagree (MG501).
    zero, one = ranks[0]["fsdp2_zombie_eval"], ranks[1]["fsdp2_zombie_eval"]
    assert codes(one) == ["MG101", "MG501"] and codes(zero) == ["MG501"]
    (mg101,) = [v for v in one["violations"] if v["code"] == "MG101"]
    assert mg101["modules"] == ["drop"]
    (mg501,) = [v for v in zero["violations"] if v["code"] == "MG501"]
    assert mg501["modules"] == ["drop"]


def test_fsdp2_swapping_parameters_is_not_a_structure_change(ranks):
    # fully_shard assigns sharded and unsharded parameters under the same names around
    # every forward: modeguard's snapshot is not rebuilt for that.
    for r in (0, 1):
        for scenario in ("fsdp2_clean", "fsdp2_zombie_eval"):
            assert ranks[r][scenario]["structure_changes"] == 0, (r, scenario)


# ---- stays quiet -----------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["clean", "no_sync", "find_unused", "unwrapped", "uneven", "fsdp2_clean"])
def test_ranks_that_agree_or_train_their_own_models_are_quiet(ranks, scenario):
    for r in (0, 1):
        assert ranks[r][scenario]["violations"] == [], (r, ranks[r][scenario])


def test_unwrapped_models_are_looked_at_and_left_alone(ranks):
    # Quiet because the rule decided they are not DDP models (rank 1's BatchNorm is in
    # eval on purpose, rank 0's is not), not because it never looked.
    assert ranks[0]["unwrapped"]["mg501_looked"] and ranks[1]["unwrapped"]["mg501_looked"]


# ---- never waits, costs nothing between looks -------------------------------------------


def _looks(steps):
    """Scheduled looks up to ``steps``, each with its retries one step apart."""
    out, s = set(), 0
    while True:
        s += ranks_disagree.next_look(s)
        if s > steps:
            return out
        out.update(range(s, s + ranks_disagree.RETRIES + 1))


def test_the_store_is_used_only_at_scheduled_looks(ranks):
    for r in (0, 1):
        steps = ranks[r]["clean"]["store_steps"]
        assert steps[0] == 1 and 64 in steps  # the first look, and the last of the 64 steps
        assert set(steps) <= _looks(64), (r, steps)


def test_no_python_call_is_added_to_a_step_between_looks(ranks):
    for r in (0, 1):
        calls = ranks[r]["clean"]["calls_per_step"]
        assert calls["on"] == calls["off"] > 0, (r, calls)


def test_a_rank_that_is_far_ahead_does_not_wait_or_retry_for_ever(ranks):
    ahead = ranks[0]["uneven"]
    assert ahead["steps"] == 66
    # Looks at 1, 2, 4, ..., 64, each followed by at most two rereads while rank 1 waits
    # at its barrier: bounded by the looks, not by the steps.
    looks = len([s for s in _looks(66) if s <= 66])
    assert ahead["store_calls"] <= 4 * looks < 3 * ahead["steps"]


def test_the_store_host_dying_turns_the_exchange_off_on_the_survivor(ranks):
    assert ranks[0]["ended"] is True
    survivor = ranks[1]["store_host_dies"]
    assert survivor["violations"] == [] and survivor["broken"] is True


# ---- the rule object --------------------------------------------------------------------


def test_rule_attributes_and_explanation():
    rule = RULES["MG501"]
    assert (rule.code, rule.name, rule.severity) == ("MG501", "ranks-disagree", Severity.ERROR)
    text = rule.explain()
    assert "validate" in text and "store" in text and "no_sync()" in text
    assert "not wrapped in DistributedDataParallel" in text


def test_schedule_doubles_then_stays_every_64_steps():
    s, looks = 0, []
    while s < 300:
        s += ranks_disagree.next_look(s)
        looks.append(s)
    assert looks == [1, 2, 4, 8, 16, 32, 64, 128, 192, 256, 320]
    assert ranks_disagree.next_look(65) == 63 and ranks_disagree.next_look(5) == 3


def test_no_other_poll_rule_asks_for_looks_closer_than_mg501_schedule():
    # MG501 counts a model's steps from the intervals it asks for, which holds only if
    # the guard never polls it sooner (it polls at the shortest interval any rule asks).
    from modeguard.rules import frozen_bn_drift

    others = [r for c, r in RULES.items() if c != "MG501" and overrides(r, "on_poll")]
    assert others, "MG301 polls"
    for rule in others:
        assert rule.poll_interval >= ranks_disagree.EVERY, rule
    assert frozen_bn_drift.REFRESH_EVERY >= ranks_disagree.EVERY


def test_a_single_process_guard_polls_as_before(isolated):
    import torch.nn as nn

    import modeguard

    assert RULES["MG501"].poll_interval == ranks_disagree.NEVER
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))
    with modeguard.watch(model, on_violation="record") as guard:
        assert guard.poll_interval == 64  # MG301's, as without MG501
        st = guard.root_state(model)
        assert RULES["MG501"].on_poll(guard, st, st.snapshot) == ranks_disagree.NEVER
        assert st.rule_state["MG501"].exchange is None
