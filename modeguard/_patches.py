"""Restorable patches: the one place modeguard replaces attributes of PyTorch's classes.

PyTorch has hooks for forwards, backwards, optimizer steps and module registration, and
modeguard uses those first. Three things have no hook: a module's ``training`` flag
changing (a setter for ``nn.Module.training``, and ``train``), copies and pickles of a watched module
(``__getstate__``/``__reduce_ex__``), and, for automatic mode, a module being called
(``nn.Module.__call__``; a global forward hook would push every submodule call onto
torch's slower hook path). Each of these goes through a ``Patches`` object, which
remembers what it replaced and puts it back in reverse order; ``SharedPatches`` installs
a set on its first user and removes it with the last one.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, List, Tuple

_MISSING = object()


class Patches:
    """Attributes replaced on classes, and torch hook handles, undone together."""

    def __init__(self):
        self._saved: List[Tuple[type, str, Any, Any]] = []  # (owner, name, original or _MISSING, replacement)
        self._handles: list = []

    def replace(self, owner: type, name: str, replacement) -> None:
        """Set ``owner.name`` to ``replacement``; ``restore()`` puts the original back (or
        deletes the attribute again where ``owner`` did not define it itself)."""
        original = owner.__dict__.get(name, _MISSING)
        self._saved.append((owner, name, original, replacement))
        setattr(owner, name, replacement)

    def add_handle(self, handle) -> None:
        """A torch ``RemovableHandle`` (a global hook) to remove with the patches."""
        self._handles.append(handle)

    def restore(self) -> None:
        for owner, name, original, replacement in reversed(self._saved):
            if owner.__dict__.get(name, _MISSING) is not replacement:
                continue  # someone patched over us since: leave theirs in place
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._saved.clear()
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __bool__(self) -> bool:
        return bool(self._saved or self._handles)


class SharedPatches:
    """A set of patches installed while at least one user holds it."""

    def __init__(self, install: Callable[[Patches], None]):
        self._install = install
        self._users = 0
        # Re-entrant: a dropped guard's finaliser may release during a collection that
        # an allocation inside acquire() set off, in the same thread.
        self._lock = threading.RLock()
        self._patches = Patches()

    def acquire(self) -> None:
        with self._lock:
            if self._users == 0:
                try:
                    self._install(self._patches)
                except BaseException:
                    self._patches.restore()  # nothing half-installed, and no user counted
                    raise
            self._users += 1

    def release(self) -> None:
        with self._lock:
            if self._users == 0:
                return
            self._users -= 1
            if self._users == 0:
                self._patches.restore()

    def add(self, owner: type, name: str, replacement) -> bool:
        """One more replacement while the set is installed, restored with the rest.
        Returns False, and replaces nothing, when no user holds the set."""
        with self._lock:
            if self._users == 0:
                return False
            self._patches.replace(owner, name, replacement)
            return True

    @property
    def users(self) -> int:
        return self._users
