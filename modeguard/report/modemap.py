"""Building a mode map: each module of a model with its mode, sensitivity, frozen state
and where its mode was last set (rendered by ``render.ModeMap``)."""

from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from ..observe import modes, sensitivity
from ..observe.snapshot import walk_marked
from .render import ModeMap


def build_mode_map(model: nn.Module, frozen_patterns: Sequence[str] = ()) -> ModeMap:
    if not isinstance(model, nn.Module):
        raise TypeError(f"a mode map is drawn of a torch.nn.Module, got {type(model).__module__}.{type(model).__name__}")
    rows = []
    for name, m, marked in walk_marked(model, frozen_patterns):
        site = modes.last_set(m)
        rows.append({
            "name": name,
            "type": type(m).__name__,
            "training": m.training,
            "sensitive": sensitivity.classify(m),
            "frozen": marked or sensitivity.params_frozen(m, recurse=False) is True,
            "mode_set_at": site.describe() if site else None,
        })
    return ModeMap(type(model).__name__, rows)
