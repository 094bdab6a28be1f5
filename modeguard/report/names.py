"""Naming the modules a finding is about, so that reports on large models stay readable.

- ``leaves``: a finding lists the modules that change behaviour themselves, not the
  containers above them (a Hugging Face ``BertLayer`` that reads ``self.training`` only to
  pick gradient checkpointing, a ``BertSelfAttention`` whose dropout is its ``dropout``
  child's): a name is dropped when a module below it is listed too.
- ``collapse``: repeated layers read as one pattern, ``bert.encoder.layer.{0..11}.output.dropout``.

Both run on the slow path only, when a finding is made or rendered.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Sequence

ROOT_NAME = "(root)"

#: A layer index inside a path (`layer.3.drop`); not a last part (`backbone.1`, `3`): a
#: Sequential's children are different layers, not repeats.
_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


def leaves(names: Sequence[str]) -> List[str]:
    """``names`` less those with another listed name below them, in their order."""
    listed = set(names)
    if len(listed) < 2:
        return list(names)
    ancestors = set()
    for name in listed:
        if name == ROOT_NAME:
            continue
        ancestors.add(ROOT_NAME)
        parts = name.split(".")
        for i in range(1, len(parts)):
            ancestors.add(".".join(parts[:i]))
    return [n for n in names if n not in ancestors]


def _ranges(numbers: Iterable[int]) -> str:
    """``{0..11}``, ``{0..3,6}``: sorted numbers as runs."""
    nums = sorted(set(numbers))
    runs, start, prev = [], nums[0], nums[0]
    for n in nums[1:]:
        if n == prev + 1:
            prev = n
            continue
        runs.append((start, prev))
        start = prev = n
    runs.append((start, prev))
    parts = [str(a) if a == b else (f"{a},{b}" if b == a + 1 else f"{a}..{b}") for a, b in runs]
    return "{" + ",".join(parts) + "}"


def collapse(names: Sequence[str]) -> List[str]:
    """Names that differ only in one layer index, written once with the indices as a set:
    ``layer.0.drop``, ``layer.1.drop`` -> ``layer.{0,1}.drop``; the first occurrence keeps
    its place. The largest group goes first, so twelve layers of three dropouts each
    become three names."""
    out = list(names)
    while True:
        groups: Dict[tuple, List[int]] = {}
        order: List[tuple] = []
        for name in out:
            for m in reversed(list(_INDEX.finditer(name))):
                key = (name[:m.start()], name[m.end():])
                if key not in groups:
                    groups[key] = []
                    order.append(key)
                groups[key].append(int(m.group()))
        best = max(order, key=lambda k: len(groups[k]), default=None)
        if best is None or len(groups[best]) < 2:
            return out
        prefix, suffix = best
        nums = groups[best]
        pattern = f"{prefix}{_ranges(nums)}{suffix}"
        merged, placed = [], False
        members = {f"{prefix}{n}{suffix}" for n in nums}
        for name in out:
            if name in members:
                if not placed:
                    merged.append(pattern)
                    placed = True
            else:
                merged.append(name)
        out = merged
