"""Rendering reports and mode maps.

Both are rich renderables that also print as plain text (``str()``), show as HTML in
Jupyter (``_repr_html_``) and export as data (``to_dict()``/``to_json()``). A report's
plain text comes from :mod:`.text`, and its rich form is drawn from the same rows and
messages. Colour follows rich: on for a terminal, off in a pipe, ``FORCE_COLOR``/``NO_COLOR``
to force either way.
"""

from __future__ import annotations

import io
import json
import sys
from typing import Iterable, List, Optional, TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from .._config import Severity
from .._version import __version__
from .text import COLUMNS, NO_PROBLEMS, WIDTH, fit_rows, report_text, table_rows, violation_text
from .violation import Violation

SCHEMA_VERSION = 1

_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}


def _plain(renderable, width: int = 120) -> str:
    buf = io.StringIO()
    # force_jupyter=False: inside a Jupyter kernel rich would otherwise display the
    # renderable in the notebook and leave the buffer empty.
    Console(file=buf, width=width, no_color=True, color_system=None, highlight=False, emoji=False, force_jupyter=False).print(renderable)
    return buf.getvalue().rstrip() + "\n"


def _html(renderable, width: int = 120) -> str:
    console = Console(record=True, file=io.StringIO(), width=width, force_jupyter=False)
    console.print(renderable)
    return console.export_html(inline_styles=True, code_format="<pre style=\"font-family:monospace\">{code}</pre>")


class Report:
    """The violations a guard found, at the moment the report was made."""

    def __init__(self, violations: Iterable[Violation], title: str = "modeguard report"):
        # Worst first; within a severity, in the order they were found.
        self.violations: List[Violation] = sorted(violations, key=lambda v: -int(v.severity))
        self.title = title

    def __len__(self) -> int:
        return len(self.violations)

    def __iter__(self):
        return iter(self.violations)

    def counts(self) -> dict:
        out = {"error": 0, "warning": 0, "info": 0}
        for v in self.violations:
            out[v.severity.label] += 1
        return out

    def worst(self) -> Optional[Severity]:
        return max((v.severity for v in self.violations), default=None)

    def table(self, width: Optional[int] = None) -> Table:
        """The summary table for rich: the plain table's rows (``text.table_rows``), their
        long cells shortened to fit a console ``width`` wide when one is given."""
        t = Table(title=self.title, title_justify="left", show_lines=False)
        for col in COLUMNS:
            t.add_column(col, overflow="fold")
        rows = table_rows(self.violations)
        if width is not None:
            # The box: a border and a space each side of every cell, 19 columns in all; a
            # cell rich had to fold would be harder to read than one cut short.
            rows = fit_rows([COLUMNS, *rows], width, indent=4, gap=3, min_cell=16)[1:]
        for v, row in zip(self.violations, rows):
            # Text cells: a model named `Net[0]` is not rich markup.
            t.add_row(Text(row[0]), Text(row[1], style=_STYLE.get(v.severity, "")), *map(Text, row[2:]))
        return t

    def __rich_console__(self, console, options):
        if not self.violations:
            yield Text(NO_PROBLEMS, style="green")
            return
        yield self.table(options.max_width)
        # Wrapped here, hanging, as the plain text is: rich would wrap long lines flush
        # left. Lines the plain text keeps whole wrap at the console's width, which
        # would break them anyway; rich still folds a path wider than the console.
        screen = options.max_width
        for v in self.violations:
            yield Text("")
            text = violation_text(v, min(WIDTH, screen), screen=screen)
            yield Text(text, style=_STYLE.get(v.severity, ""), overflow="fold")

    def __str__(self) -> str:
        if not self.violations:
            return NO_PROBLEMS + "\n"
        return report_text(self.violations, self.title)

    def __repr__(self) -> str:
        c = self.counts()
        return f"<modeguard Report: {c['error']} error, {c['warning']} warning, {c['info']} info>"

    def _repr_html_(self) -> str:
        return _html(self)

    def _repr_pretty_(self, p, cycle) -> None:
        # IPython's text/plain (a terminal, `display(report)`): the report itself, while
        # repr() stays one line for logs and debuggers.
        p.text(str(self).rstrip("\n"))

    def to_dict(self, **extra) -> dict:
        out = {"modeguard": __version__, "schema": SCHEMA_VERSION}
        out.update(extra)
        out["violations"] = [v.to_dict() for v in self.violations]
        out["counts"] = self.counts()
        return out

    def to_json(self, indent: int = 2, **extra) -> str:
        return json.dumps(self.to_dict(**extra), indent=indent)


def print_report(report: Report, file: Optional[TextIO] = None) -> None:
    """Print a report for a person: drawn by rich on a terminal (or with ``FORCE_COLOR``),
    anywhere else its plain text, exactly ``str(report)``."""
    file = sys.stdout if file is None else file
    console = Console(file=file, highlight=False, force_jupyter=False)
    if console.is_terminal:
        console.print(report)
    else:
        file.write(str(report))
        file.flush()


class ModeMap:
    """A tree of a model: each module's mode, sensitivity, frozen state and where its mode
    was last set."""

    def __init__(self, root_name: str, rows: list):
        self.root_name = root_name
        self.rows = rows  # dicts in named_modules order

    def to_dict(self) -> dict:
        return {"model": self.root_name, "modules": self.rows}

    def __rich__(self):
        tree = Tree(Text(self.root_name, style="bold"))
        nodes = {"": tree}
        for row in self.rows:
            name = row["name"]
            if name == "":
                tree.label = self._label(row, self.root_name)
                continue
            parent = nodes.get(name.rpartition(".")[0], tree)
            nodes[name] = parent.add(self._label(row, name.rpartition(".")[2]))
        return tree

    @staticmethod
    def _label(row, short) -> Text:
        mode = "train" if row["training"] else "eval"
        t = Text(f"{short} ", style="bold" if row["sensitive"] else "")
        t.append(f"({row['type']}) ", style="dim")
        t.append(mode, style="green" if row["training"] else "magenta")
        if row["sensitive"]:
            t.append(f" sensitive:{row['sensitive']}", style="yellow")
        if row["frozen"]:
            t.append(" frozen", style="blue")
        if row["mode_set_at"]:
            t.append(f"  <- {row['mode_set_at']}", style="dim")
        return t

    def __str__(self) -> str:
        return _plain(self)

    def _repr_html_(self) -> str:
        return _html(self)

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(str(self).rstrip("\n"))

    def __repr__(self) -> str:
        return f"<modeguard ModeMap of {self.root_name}: {len(self.rows)} modules>"
