"""Finding the user's own line.

Every report and warning points at the innermost frame of the user's own code: past
modeguard, torch and the wrappers between them (*internal* frames), and past the frameworks
the user's code runs in (*framework* frames: anything installed in site-packages, such as
Lightning, transformers and accelerate), so that a finding inside ``trainer.fit()`` points
at the user's ``training_step``, or at the ``trainer.fit()`` call itself. Where no frame is
the user's (a program run entirely by an installed tool), the first frame that is not
internal is taken. Whether a file is internal or a framework's is cached per file name,
so the walk is a few dict lookups even on the hot path.
"""

from __future__ import annotations

import ast
import itertools
import linecache
import os
import site
import sys
import sysconfig
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import wrapt

_PKG_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_WRAPT_DIR = os.path.dirname(os.path.abspath(wrapt.__file__)) + os.sep
_STDLIB_WRAPPERS = tuple(
    os.path.join(sysconfig.get_paths()["stdlib"], name) for name in ("contextlib.py", "functools.py")
)
_INTERNAL_PREFIXES = (_PKG_DIR, _TORCH_DIR, _WRAPT_DIR)
# The bundled demo is "user code" for the purpose of pointing at lines.
_USER_FILES_IN_PKG = (os.path.join(_PKG_DIR, "demo.py"),)

#: co_filename -> internal? Keyed by the file, the only thing the answer depends on (two
#: equal code objects from different files compare equal, so they cannot be the key).
_internal_cache: dict = {}
#: co_filename -> internal or a framework's (installed in site-packages)?
_framework_cache: dict = {}


def _site_dirs() -> tuple:
    dirs = set()
    try:
        dirs.update(site.getsitepackages())
        dirs.add(site.getusersitepackages())
    except Exception:  # pragma: no cover - a virtualenv's old site module
        pass
    paths = sysconfig.get_paths()
    dirs.update(p for p in (paths.get("purelib"), paths.get("platlib")) if p)
    return tuple(os.path.join(os.path.abspath(d), "") for d in dirs if d)


_SITE_DIRS = _site_dirs()
_SITE_NAMES = (os.sep + "site-packages" + os.sep, os.sep + "dist-packages" + os.sep)


def _main_package() -> str:
    """The top-level package of ``python -m pkg.train`` (the user's own, even installed)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None) or ""
    return name.partition(".")[0]


def _is_internal(code) -> bool:
    fn = code.co_filename
    hit = _internal_cache.get(fn)
    if hit is None:
        path = os.path.abspath(fn) if not fn.startswith("<") else fn
        hit = (path.startswith(_INTERNAL_PREFIXES) and path not in _USER_FILES_IN_PKG) or path in _STDLIB_WRAPPERS
        # Entry points run user scripts through runpy; the script's own frames are user
        # code, but runpy's (and other frozen bootstrap code) are not.
        if not hit and (path.endswith(os.sep + "runpy.py") or path.startswith("<frozen")):
            hit = True
        _internal_cache[fn] = hit
    return hit


def _is_framework(code) -> bool:
    """Internal, or code of an installed framework (a file in site-packages), except the
    package the program was started from with ``-m``."""
    fn = code.co_filename
    hit = _framework_cache.get(fn)
    if hit is None:
        hit = _is_internal(code)
        if not hit and not fn.startswith("<"):
            path = os.path.abspath(fn)
            if path.startswith(_SITE_DIRS) or any(part in path for part in _SITE_NAMES):
                main = _main_package()
                hit = not main or (os.sep + main + os.sep) not in path and not path.endswith(os.sep + main + ".py")
        _framework_cache[fn] = hit
    return hit


def _user_from(f):
    """The innermost frame of the user's code from ``f`` outwards; failing that, the
    first frame that is not internal (a program whose every frame is a framework's)."""
    fallback = None
    while f is not None:
        code = f.f_code
        if not _is_framework(code):
            return f
        if fallback is None and not _is_internal(code):
            fallback = f
        f = f.f_back
    return fallback


def framework_caller() -> Optional[str]:
    """Slow path, for where a mode was set: the framework function that made the change
    now in progress (``Trainer.training_step (transformers)``), or None when the user's
    code made it. The first frame past modeguard, torch and any ``train()``/``eval()`` of
    a module (a model's own override, or a framework model's) decides."""
    f = sys._getframe(1)
    while f is not None:
        code = f.f_code
        if _is_internal(code) or (code.co_name in ("train", "eval") and _is_module(f.f_locals.get("self"))):
            f = f.f_back
            continue
        if not _is_framework(code):
            return None
        package = (f.f_globals.get("__name__") or "").partition(".")[0] or os.path.basename(code.co_filename)
        return f"{getattr(code, 'co_qualname', code.co_name)} ({package})"
    return None


def _is_module(obj) -> bool:
    return isinstance(obj, torch.nn.Module)


@dataclass(frozen=True)
class Location:
    """A place in the user's code."""

    file: str
    line: int
    function: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} in {self.function}()"

    def short(self) -> str:
        return f"{os.path.basename(self.file)}:{self.line}"

    def to_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "function": self.function}


def user_frame(depth: int = 1):
    """The innermost frame of the user's code (see the module's docstring), or None.
    Never store the frame itself: it keeps every local of the user's function
    (activations) alive."""
    try:
        f = sys._getframe(depth + 1)
    except ValueError:
        return None
    return _user_from(f)


def user_frame_from(frame):
    """The innermost frame of the user's code, starting at ``frame`` itself."""
    return _user_from(frame)


def user_stacklevel(depth: int = 1) -> int:
    """The ``warnings.warn`` stacklevel, for a call ``depth`` frames up, that lands on
    ``user_frame``'s frame (1: the frame that calls warnings.warn)."""
    target = user_frame(depth + 1)
    f = sys._getframe(depth + 1)
    level = 1
    while f is not None and f is not target:
        f = f.f_back
        level += 1
    return level if f is not None else 1


def is_internal_frame(frame) -> bool:
    return _is_internal(frame.f_code)


def user_code_line(depth: int = 1):
    """Cheap hot-path capture: (code object, line) of the user's frame; no frame kept."""
    f = user_frame(depth + 1)
    if f is None:
        return None
    return (f.f_code, f.f_lineno)


def to_location(code_line) -> Optional[Location]:
    if code_line is None:
        return None
    code, line = code_line
    return Location(code.co_filename, line, code.co_name)


def user_location(depth: int = 1) -> Optional[Location]:
    return to_location(user_code_line(depth + 1))


def stack_has_function(names: set, filename_part: str = "") -> bool:
    """Slow path: is any frame on the stack one of ``names`` (optionally in a file whose
    path contains ``filename_part``)? Used to recognise library helpers like update_bn."""
    f = sys._getframe(1)
    while f is not None:
        code = f.f_code
        if code.co_name in names and filename_part in code.co_filename:
            return True
        f = f.f_back
    return False


# ---- what a call site spells out (slow path) ---------------------------------------------

class CallShape(NamedTuple):
    """The arguments a call expression writes out: positional ones, keyword names, and
    whether it unpacks ``*args``/``**kwargs`` (then anything may have been passed)."""

    positional: int
    keywords: frozenset
    unpacks: bool


_calls_cache: dict = {}  # filename -> (the linecache lines it was parsed from, {span: Call})


def _calls_in(filename: str):
    lines = linecache.getlines(filename)
    if not lines:
        return None
    hit = _calls_cache.get(filename)
    if hit is not None and hit[0] is lines:
        return hit[1]
    try:
        tree = ast.parse("".join(lines), filename)
    except (SyntaxError, ValueError):
        return None
    spans = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            spans[(node.lineno, node.end_lineno, node.col_offset, node.end_col_offset)] = node
    _calls_cache[filename] = (lines, spans)
    return spans


def call_shape(frame, name: str = "") -> Optional[CallShape]:
    """Slow path: the shape of the call ``frame`` is making right now, read from its source;
    None where the source or the call cannot be found. On Python 3.11+ the instruction's
    position names the call exactly; before that, the one call of a function called
    ``name`` on the current line is taken."""
    code = frame.f_code
    spans = _calls_in(code.co_filename)
    if spans is None:
        return None
    node = None
    if hasattr(code, "co_positions"):
        pos = next(itertools.islice(code.co_positions(), frame.f_lasti // 2, None), None)
        node = spans.get(pos) if pos is not None else None
    else:  # pragma: no cover - Python < 3.11
        line = frame.f_lineno
        found = [n for (start, end, _, _), n in spans.items() if start <= line <= end and _callee_name(n) == name]
        node = found[0] if len(found) == 1 else None
    if node is None:
        return None
    unpacks = any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords)
    return CallShape(len(node.args), frozenset(k.arg for k in node.keywords if k.arg is not None), unpacks)


def _callee_name(node: ast.Call) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
