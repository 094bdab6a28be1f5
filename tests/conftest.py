"""Set-up shared by the whole suite. Kept small: the models live in tests/models.py.

One torch thread for every test: the models are tiny, and a thread pool only adds
contention on a busy machine (some tests went from 2 s to 40 s with the load). Tests that
start a Python subprocess give it ``OMP_NUM_THREADS=1`` in the environment they build.
"""

import pytest
import torch

from modeguard import _auto as auto
from modeguard.observe import modes

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_guard_left_behind():
    """Every test must leave nn.Module as it found it: no guard watching, no automatic
    mode. One that does fails here, and is cleaned up so that the next test starts clean."""
    yield
    left = [what for what, on in (("automatic watching", auto.active()), ("a guard watching", modes.is_patched())) if on]
    if left:
        auto.stop()
        while modes.PATCHES.users:
            modes.PATCHES.release()
        pytest.fail(f"the test left {' and '.join(left)} behind", pytrace=False)


@pytest.fixture
def isolated(monkeypatch):
    """A seeded test with no MODEGUARD override."""
    monkeypatch.delenv("MODEGUARD", raising=False)
    torch.manual_seed(0)


@pytest.fixture
def epochs(monkeypatch):
    """modes.MODE_EPOCH, STRUCTURE_EPOCH and the listeners put back as they were."""
    monkeypatch.setattr(modes, "ON_EPOCH", dict(modes.ON_EPOCH))
    saved = modes.MODE_EPOCH[0], modes.STRUCTURE_EPOCH[0]
    yield
    modes.MODE_EPOCH[0], modes.STRUCTURE_EPOCH[0] = saved


@pytest.fixture
def mode_patches(epochs):
    """modeguard's patches on nn.Module for the test, as while a guard watches, and no
    guard: mode changes are recorded (modes.last_set) and move the epochs."""
    modes.PATCHES.acquire()
    try:
        yield
    finally:
        modes.PATCHES.release()
