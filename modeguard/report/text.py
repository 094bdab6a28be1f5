"""The plain-text renderer: every text a user reads about violations comes from here.

``Violation.message`` (and so every warning and error), ``str(report)``, the ``modeguard
run`` summary, the pytest failure message and the demo are built by these functions; the
rich table for terminals is built from the same rows (``table_rows``). Nothing here is
re-wrapped afterwards: a field's long value wraps at ``WIDTH`` with its continuation lines
hanging under the value, not flush left.
"""

from __future__ import annotations

import re
import textwrap
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

from .names import collapse

if TYPE_CHECKING:
    from .violation import Violation

#: Where field values wrap.
WIDTH = 88
#: The summary table fits a terminal this wide: the model / modules and mode set at
#: cells are shortened (each message below still has them in full).
TABLE_WIDTH = 100
#: A shortened model / modules cell keeps at least this many characters.
_MIN_CELL = 24

NO_PROBLEMS = "modeguard: no train/eval mode problems found."

COLUMNS = ("code", "severity", "count", "model / modules", "where", "mode set at")

# "  mode set: " is the longest field prefix: every value starts in the same column.
_LABEL_WIDTH = len("mode set:")


def hang(prefix: str, text: str, width: Optional[int] = WIDTH) -> str:
    """``prefix + text``, wrapped at ``width`` with each continuation line indented by
    ``len(prefix)``, so it hangs under the text. Breaks only at spaces (file paths and
    hyphenated names stay whole); ``width=None`` keeps it on one line."""
    if width is None:
        return prefix + text
    return textwrap.fill(
        " ".join(text.split()), width, initial_indent=prefix, subsequent_indent=" " * len(prefix),
        break_long_words=False, break_on_hyphens=False,
    )


def field(label: str, value: str, width: Optional[int] = WIDTH) -> str:
    """One field of a message, ``  why:      value``, its value hanging."""
    return hang(f"  {label + ':':<{_LABEL_WIDTH}} ", value, width)


def modules_text(v: "Violation", limit: int = 8) -> str:
    """``Model; modules: a, b`` for a message's ``model:`` field; repeated layers are
    written once (``layer.{0..11}.dropout``, see ``names.collapse``)."""
    if not v.modules:
        return v.model
    names = collapse(v.modules)
    shown = ", ".join(names[:limit])
    if len(names) > limit:
        shown += f", ... ({len(v.modules)} in all)"
    return f"{v.model}; modules: {shown}"


def violation_text(v: "Violation", width: int = WIDTH, screen: Optional[int] = None) -> str:
    """A violation's message: the headline, then its fields.

    ``model:``, ``why:`` and ``fix:`` wrap at ``width``. The headline and the two fields
    that hold a source location (``where:``, ``mode set:``) stay on one line: a
    ``file:line`` must stay whole for terminals and editors to follow it and for grep to
    find it. Given the width of a ``screen`` that would break them anyway (a terminal's),
    they wrap there, hanging like the rest."""
    lines = [hang(f"{v.code} {v.name} [{v.severity.label}]: ", f"{v.headline}.", screen)]
    if v.location is not None:
        lines.append(field("where", str(v.location), screen))
    lines.append(field("model", modules_text(v), width))
    if v.mode_set_at is not None:
        lines.append(field("mode set", v.mode_set_at.describe(), screen))
    lines.append(field("why", v.why, width))
    lines.append(field("fix", v.fix, width))
    return "\n".join(lines)


def table_row(v: "Violation") -> Tuple[str, ...]:
    """One violation's cells, in ``COLUMNS`` order; the plain and the rich table both
    show these."""
    mods = v.model
    if v.modules:
        names = collapse(v.modules)
        mods += ": " + ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")
    site = v.mode_set_at
    if site is None:
        set_at = "-"
    else:
        framework = getattr(site, "framework", None)
        if framework:
            # Who did it matters most; the location is the user's call into the framework.
            set_at = f"{framework.partition(' (')[0]}: {site.how}"
        elif site.location is not None:
            set_at = f"{site.how} at {site.location.short()}"
        else:
            set_at = site.how
    return (
        f"{v.code} {v.name}", v.severity.label, str(v.count), mods,
        v.location.short() if v.location else "-", set_at,
    )


def table_rows(violations: Sequence["Violation"]) -> List[Tuple[str, ...]]:
    return [table_row(v) for v in violations]


def shorten(cell: str, width: int) -> str:
    """``cell``, cut to ``width`` with ``...`` at the end when it is longer."""
    return cell if len(cell) <= width else cell[:width - 3].rstrip(" ,.") + "..."


_METHOD_OWNER = re.compile(r"\b[\w.]+\.((?:train|eval)\(\))")


def fit_rows(rows: Sequence[Tuple[str, ...]], width: int = TABLE_WIDTH, indent: int = 2,
             gap: int = 2, min_cell: int = _MIN_CELL) -> List[Tuple[str, ...]]:
    """``rows`` (header first) made to fit ``width`` columns where they can: first the
    mode set at cells lose the class before ``.eval()``/``.train()`` (the model column names
    it), then the model / modules cells are cut, keeping ``min_cell`` of them. A location
    (``file:line``) is never cut: a table whose locations alone are wider stays wider."""
    def excess(rows):
        return indent + sum(max(len(r[i]) for r in rows) for i in range(len(COLUMNS))) + gap * (len(COLUMNS) - 1) - width

    over = excess(rows)
    if over <= 0:
        return list(rows)
    rows = [rows[0], *(r[:5] + (_METHOD_OWNER.sub(r"\1", r[5]),) + r[6:] for r in rows[1:])]
    over = excess(rows)
    mods = max(len(r[3]) for r in rows)
    if over > 0 and mods > min_cell:
        mods = max(min_cell, mods - over)
        rows = [rows[0], *(r[:3] + (shorten(r[3], mods),) + r[4:] for r in rows[1:])]
    return list(rows)


def plain_table(violations: Sequence["Violation"], width: int = TABLE_WIDTH) -> List[str]:
    """The summary table as lines of aligned columns, indented two spaces, header first,
    fitting ``width`` columns (``fit_rows``)."""
    rows = fit_rows([COLUMNS, *table_rows(violations)], width)
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]


def report_text(violations: Sequence["Violation"], title: str, details: bool = True) -> str:
    """``title``, the table, and (with ``details``) each violation's message after a blank
    line; ends with a newline. With no violations, ``title`` alone."""
    lines = [title]
    if violations:
        lines += plain_table(violations)
        if details:
            lines += ["", "\n\n".join(violation_text(v) for v in violations)]
    return "\n".join(lines) + "\n"
