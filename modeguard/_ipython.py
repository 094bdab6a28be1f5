"""The notebook extension: ``%load_ext modeguard``.

Turns on the same automatic watching as ``modeguard run`` for the cells that follow and,
after each cell, shows under it the violations that cell produced, once. The
``%modeguard`` line magic pauses, resumes, reports and draws mode maps. A thin layer over
:mod:`modeguard._auto`: reports render themselves (HTML in Jupyter, text in a terminal);
this module only decides what to show when, and names cells ``In[5]`` instead of the
kernel's temporary file names.
"""

from __future__ import annotations

import dataclasses
import shlex
from typing import List, Optional

import torch.nn as nn

from . import _auto as auto
from ._frames import Location
from .report.modemap import build_mode_map
from .observe import modes
from .report import ModeMap, Report, Violation

USAGE = "%modeguard off | on | report | modes MODEL | clear"

_watcher: Optional["NotebookWatcher"] = None


class NotebookWatcher:
    """The extension's state for one IPython shell."""

    def __init__(self, shell):
        self.shell = shell
        # Every guard this session used, oldest first: `%modeguard off` ends a guard and
        # `on` starts a new one, but `%modeguard report` still covers the earlier cells.
        self.guards: list = []
        # Guards this extension started; one started before `%load_ext` (auto.start() in
        # the notebook) is used but left running at unload.
        self._own: list = []
        # id(violation) -> (violation, its count when last shown); the violation is held so
        # that its id cannot be reused by another object.
        self._shown: dict = {}

    # ---- lifecycle -------------------------------------------------------------------

    def load(self) -> None:
        self._resume()
        self.shell.events.register("post_run_cell", self.post_run_cell)
        self.shell.register_magic_function(self.magic, magic_kind="line", magic_name="modeguard")

    def unload(self) -> None:
        try:
            self.shell.events.unregister("post_run_cell", self.post_run_cell)
        except ValueError:  # already gone: unloading must not fail halfway
            pass
        self.shell.magics_manager.magics["line"].pop("modeguard", None)
        if auto.current() is not None and auto.current() in self._own:
            auto.stop()

    def _resume(self):
        if auto.active():
            guard = auto.current()
        else:
            from IPython.core.error import UsageError

            from ._config import ConfigError

            try:
                guard = auto.start(on_violation="record")
            except ConfigError as exc:  # MODEGUARD=banana: one line, not a traceback
                raise UsageError(f"modeguard: {exc}") from None
            self._own.append(guard)
        if guard not in self.guards:
            self.guards.append(guard)
        return guard

    @property
    def watching(self) -> bool:
        return auto.active() and auto.current() in self.guards

    # ---- after every cell ------------------------------------------------------------

    def post_run_cell(self, result=None) -> None:
        new, again = self._since_last_cell()
        if new:
            self._display(Report(self._for_display(new), title="modeguard: found in this cell"))
        if again:
            parts = ", ".join(
                f"{v.code} {v.name} at {self._cell_location(v.location).short() if v.location else '?'} (+{n})"
                for v, n in again
            )
            print(f"modeguard: shown before, happened again in this cell: {parts}. `%modeguard report` shows all.")

    def _since_last_cell(self):
        new: List[Violation] = []
        again: list = []
        for v in self.all_violations():
            seen = self._shown.get(id(v))
            if seen is None:
                new.append(v)
            elif v.count > seen[1]:
                again.append((v, v.count - seen[1]))
            self._shown[id(v)] = (v, v.count)
        return new, again

    def all_violations(self) -> List[Violation]:
        return [v for g in self.guards for v in g.violations]

    # ---- the %modeguard magic --------------------------------------------------------

    def magic(self, line: str):
        """Control modeguard in this notebook: %modeguard off | on | report | modes MODEL | clear"""
        from IPython.core.error import UsageError

        try:
            words = shlex.split(line)
        except ValueError as e:
            raise UsageError(f"%modeguard: {e}. Usage: {USAGE}") from None
        cmd, args = (words[0].lower(), words[1:]) if words else ("", [])
        if cmd == "off" and not args:
            if not self.watching:
                print("modeguard: already off. `%modeguard on` resumes watching.")
                return
            auto.stop()
            print("modeguard: paused; the following cells are not watched. `%modeguard on` resumes.")
        elif cmd == "on" and not args:
            if self.watching:
                print("modeguard: already watching.")
                return
            self._resume()
            print("modeguard: watching the following cells again.")
        elif cmd == "report" and not args:
            self._since_last_cell()  # what the report shows counts as shown
            self._display(Report(self._for_display(self.all_violations()), title="modeguard report (all cells so far)"))
        elif cmd == "clear" and not args:
            for g in self.guards:
                g.clear()
            self.guards = [g for g in self.guards if g.active]
            self._own = [g for g in self._own if g.active]
            self._shown.clear()
            print("modeguard: forgot the violations found so far.")
        elif cmd == "modes" and len(args) == 1:
            self._display(self.mode_map(self._lookup(args[0])))
        elif cmd == "":
            state = "watching" if self.watching else "paused"
            n = len(self.all_violations())
            print(f"modeguard: {state}; {n} distinct violation(s) so far. Usage: {USAGE}")
        else:
            raise UsageError(f"%modeguard: cannot understand {line.strip()!r}. Usage: {USAGE}")

    def _lookup(self, expr: str) -> nn.Module:
        """A variable of the notebook, or an attribute path on one (``model.backbone``);
        looked up, never evaluated."""
        from IPython.core.error import UsageError

        name, *attrs = expr.split(".")
        if name not in self.shell.user_ns:
            raise UsageError(f"%modeguard modes: no variable named {name!r} in this notebook. Usage: %modeguard modes MODEL")
        obj = self.shell.user_ns[name]
        for i, attr in enumerate(attrs):
            if not hasattr(obj, attr):
                path = ".".join([name] + attrs[:i])
                raise UsageError(f"%modeguard modes: {path} has no attribute {attr!r}.")
            obj = getattr(obj, attr)
        if not isinstance(obj, nn.Module):
            raise UsageError(
                f"%modeguard modes: {expr} is a {type(obj).__module__}.{type(obj).__name__}, not a torch.nn.Module."
            )
        return obj

    def mode_map(self, model: nn.Module) -> ModeMap:
        guard = auto.current()
        mm = guard.mode_map(model) if guard is not None and guard.active else build_mode_map(model)
        # Rows hold "where the mode was set" as text; rebuild it with cell names.
        by_name = dict(model.named_modules())
        for row in mm.rows:
            m = by_name.get(row["name"])
            site = modes.last_set(m) if m is not None else None
            if site is not None:
                row["mode_set_at"] = dataclasses.replace(site, location=self._cell_location(site.location)).describe()
        return mm

    # ---- display ---------------------------------------------------------------------

    def _display(self, obj) -> None:
        from IPython.display import display

        display(obj)

    def _cell_location(self, loc: Optional[Location]) -> Optional[Location]:
        """``/tmp/ipykernel_123/456.py:7`` -> ``In[3]:7``: the name the notebook shows."""
        if loc is None:
            return None
        compiler = getattr(self.shell, "compile", None)
        label = compiler.format_code_name(loc.file) if hasattr(compiler, "format_code_name") else None
        return Location(label[1], loc.line, loc.function) if label else loc

    def _for_display(self, violations: List[Violation]) -> List[Violation]:
        out = []
        for v in violations:
            site = v.mode_set_at
            if site is not None:
                site = dataclasses.replace(site, location=self._cell_location(site.location))
            out.append(dataclasses.replace(v, location=self._cell_location(v.location), mode_set_at=site))
        return out


def load_ipython_extension(ipython) -> None:
    global _watcher
    if _watcher is not None:
        if _watcher.shell is ipython:
            return
        _watcher.unload()  # a different shell in the same process: move over
    watcher = NotebookWatcher(ipython)
    watcher.load()  # a bad MODEGUARD setting stops here, before anything is registered
    _watcher = watcher
    print(f"modeguard: watching every model and optimizer in the following cells. {USAGE}")


def unload_ipython_extension(ipython) -> None:
    global _watcher
    if _watcher is None:
        return
    _watcher.unload()
    _watcher = None
