"""Assertions for users' own tests: is evaluation deterministic, is every mode-sensitive
module in the mode it should be, does a function leave the modes as it found them.

Each raises ``AssertionError`` whose message names the offending modules and, when it is
known, where their mode was set. While a helper runs, modeguard's mode patches are on, so
modes changed inside it are traced back to the line that changed them.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, List, Optional

import torch
import torch.nn as nn

from .observe import modes, sensitivity
from .observe.modes import PATCHES
from .observe.snapshot import ModeSnapshot

__all__ = ["assert_eval_deterministic", "assert_modes", "assert_modes_unchanged"]


def _mode(training: bool) -> str:
    return "train" if training else "eval"


def _describe(name: str, module: nn.Module, site=None, with_site: bool = True) -> str:
    text = f"{name or '(root)'} ({type(module).__name__})"
    site = site if site is not None else (modes.last_set(module) if with_site else None)
    # Sites are recorded only while modeguard is on; one that disagrees with the module's
    # mode is from before a later, untraced change.
    if site is not None and site.training == module.training:
        text += f"; mode set: {site.describe()}"
    return text


@contextlib.contextmanager
def _tracing_modes() -> Iterator[None]:
    """Mode patches on for the block, so mode changes in it record where they happened."""
    PATCHES.acquire()
    try:
        yield
    finally:
        PATCHES.release()


def _save_modes(model: nn.Module) -> list:
    return [(m, m.training) for m in model.modules()]


def _restore_modes(saved: list) -> None:
    for m, training in saved:
        if m.training != training:
            m.training = training


# ---- assert_eval_deterministic --------------------------------------------------------

def _differences(a, b, path: str, atol: float, rtol: float, out: List[str]) -> None:
    """Paths into two outputs (tensors, nested tuples/lists/dicts) where they differ."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            out.append(f"{path}: shape/dtype {tuple(a.shape)}/{a.dtype} vs {tuple(b.shape)}/{b.dtype}")
        elif a.is_floating_point() or a.is_complex():
            if not torch.allclose(a, b, atol=atol, rtol=rtol, equal_nan=True):
                diff = (a - b).abs()
                worst = diff[~diff.isnan()].max().item() if diff.numel() else math.nan
                out.append(f"{path}: max abs difference {worst:.3g}")
        elif not torch.equal(a, b):
            out.append(f"{path}: values differ")
    elif isinstance(a, dict) and isinstance(b, dict):
        for key in a.keys() | b.keys():
            if key not in a or key not in b:
                out.append(f"{path}[{key!r}]: present in only one output")
            else:
                _differences(a[key], b[key], f"{path}[{key!r}]", atol, rtol, out)
    elif isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        if len(a) != len(b):
            out.append(f"{path}: length {len(a)} vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            _differences(x, y, f"{path}[{i}]", atol, rtol, out)
    elif type(a) is not type(b) or a != b:
        out.append(f"{path}: {a!r} vs {b!r}")


def _owner(model: nn.Module, buffer_name: str):
    owner_name, _, attr = buffer_name.rpartition(".")
    return owner_name, model.get_submodule(owner_name), attr


def assert_eval_deterministic(model: nn.Module, *inputs, atol: float = 0.0, rtol: float = 0.0, **kwargs) -> None:
    """Put ``model`` in eval mode, run ``model(*inputs, **kwargs)`` twice under
    ``torch.no_grad()``, and assert that both outputs are identical (within ``atol``/
    ``rtol`` if given), that no buffer changed (BatchNorm running statistics), and that
    no mode-sensitive module is still in train mode (a Dropout left on by a ``train()``
    override or by the forward itself). The model's modes and buffers are restored
    afterwards, whether the assertion passes or not."""
    __tracebackhide__ = True
    if not isinstance(model, nn.Module):
        raise TypeError(f"assert_eval_deterministic expects an nn.Module, got {type(model).__name__}")
    saved_modes = _save_modes(model)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        with _tracing_modes():
            model.eval()
            with torch.no_grad():
                first = model(*inputs, **kwargs)
                second = model(*inputs, **kwargs)
            in_train = [(n, m) for n, m in model.named_modules() if m.training and sensitivity.classify(m)]
        changed = [n for n, b in model.named_buffers() if n in buffers and not _same(buffers[n], b)]
        outputs = []
        _differences(first, second, "output", atol, rtol, outputs)
        problems = []
        if in_train:
            problems.append(
                f"{len(in_train)} mode-sensitive module(s) are in train mode after model.eval() and the forwards:\n"
                + "\n".join(f"  - {_describe(n, m)}" for n, m in in_train)
            )
        if changed:
            by_owner: dict = {}
            for name in changed:
                owner_name, owner, attr = _owner(model, name)
                by_owner.setdefault((owner_name, owner), []).append(attr)
            problems.append(
                "buffers changed during the eval forwards:\n"
                + "\n".join(
                    f"  - {_describe(n, m, with_site=False)}, {_mode(m.training)} mode: {', '.join(attrs)}"
                    for (n, m), attrs in by_owner.items()
                )
            )
        if outputs:
            hint = "" if in_train else (
                "\n  every mode-sensitive module is in eval, so the randomness comes from elsewhere: "
                "functional dropout with training=True, torch.rand/randn in forward, or a module modeguard "
                "does not know (modeguard.register_sensitive)"
            )
            problems.append("two eval forwards on the same input gave different outputs:\n"
                            + "\n".join(f"  - {d}" for d in outputs) + hint)
        if problems:
            raise AssertionError(f"{type(model).__name__} is not deterministic in eval mode:\n" + "\n".join(problems))
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers and b.shape == buffers[name].shape:
                    b.copy_(buffers[name])
        _restore_modes(saved_modes)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, atol=0, rtol=0, equal_nan=True)))


# ---- assert_modes ---------------------------------------------------------------------

def _frozen_on_purpose(model: nn.Module, snapshot: ModeSnapshot) -> set:
    """Names of sensitive modules that are frozen: marked with modeguard.frozen (or under
    a marked module), or whose own parameters all have requires_grad=False. A module
    without parameters (Dropout) follows the nearest enclosing module that has some."""
    modules = dict(model.named_modules())
    out = set()
    for e in snapshot.entries:
        name = "" if e.name == "(root)" else e.name
        if e.marked or e.own_frozen is True:
            out.add(e.name)
            continue
        if e.own_frozen is None:
            parent = name
            while parent:
                parent = parent.rpartition(".")[0]
                verdict = sensitivity.params_frozen(modules[parent], recurse=True)
                if verdict is not None:
                    if verdict:
                        out.add(e.name)
                    break
    return out


def assert_modes(model: nn.Module, training: bool = True, except_frozen: bool = True) -> None:
    """Assert that every mode-sensitive module of ``model`` (Dropout, BatchNorm, ...) is
    in train mode (``training=True``) or eval mode (``training=False``). With
    ``except_frozen`` modules frozen on purpose (``modeguard.frozen``, or all parameters
    ``requires_grad=False``) are skipped: they may stay in eval while the rest trains."""
    __tracebackhide__ = True
    if not isinstance(model, nn.Module):
        raise TypeError(f"assert_modes expects an nn.Module, got {type(model).__name__}")
    snap = ModeSnapshot(model)
    skip = _frozen_on_purpose(model, snap) if except_frozen else set()
    wrong = [e for e in snap.entries if e.training != bool(training) and e.name not in skip]
    if not wrong:
        return
    lines = []
    for e in wrong:
        m = e.ref()
        lines.append(f"  - {_describe(e.name, m, site=e.site) if m is not None else e.name}")
    raise AssertionError(
        f"{len(wrong)} mode-sensitive module(s) of {type(model).__name__} are in {_mode(not training)} mode, "
        f"expected {_mode(training)}:\n" + "\n".join(lines)
        + f"\n  fix: call model.{'train' if training else 'eval'}() before this point"
    )


# ---- assert_modes_unchanged -----------------------------------------------------------

@contextlib.contextmanager
def assert_modes_unchanged(model: nn.Module) -> Iterator[None]:
    """Assert that the block leaves every module of ``model`` in the mode it found it::

        with modeguard.testing.assert_modes_unchanged(model):
            validate(model, loader)   # must put the model back in train mode

    The message names the modules whose mode changed and the line that changed it."""
    __tracebackhide__ = True
    if not isinstance(model, nn.Module):
        raise TypeError(f"assert_modes_unchanged expects an nn.Module, got {type(model).__name__}")
    before = dict((name, m.training) for name, m in model.named_modules())
    with _tracing_modes():
        yield
        after = [(name, m) for name, m in model.named_modules() if name in before and m.training != before[name]]
        sites = {name: modes.last_set(m) for name, m in after}
    if not after:
        return
    sensitive = [(n, m) for n, m in after if sensitivity.classify(m)]
    shown = sensitive or after
    lines = [f"  - {_describe(n, m, site=sites[n])}: {_mode(before[n])} -> {_mode(m.training)}" for n, m in shown[:20]]
    if len(shown) > 20:
        lines.append(f"  ... ({len(shown)} in all)")
    what = "mode-sensitive module(s)" if sensitive else "module(s)"
    raise AssertionError(
        f"the block changed the mode of {len(shown)} {what} of {type(model).__name__} and did not restore it:\n"
        + "\n".join(lines)
    )
