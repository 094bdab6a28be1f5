"""Fixtures shared by the rule tests. Kept small: the models live in tests/models.py."""

import pytest
import torch

from modeguard.observe import modes


@pytest.fixture
def isolated(monkeypatch):
    """A seeded test with no MODEGUARD override, which must leave no guard behind."""
    monkeypatch.delenv("MODEGUARD", raising=False)
    torch.manual_seed(0)
    yield
    assert not modes.is_patched(), "the test left a guard watching"
