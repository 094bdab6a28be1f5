"""Running the user's program as ``python SCRIPT.py ARGS`` or ``python -m MODULE ARGS``
would, under automatic watching (the engine behind ``modeguard run``).

The program runs through ``runpy`` as ``__main__`` with its own ``sys.argv``, and
``sys.path[0]`` is what Python itself would put there: the script's folder, or the
current directory for ``-m``. While it runs, ``sys.modules["__main__"]`` is the
program's module, so classes it defines pickle as ``__main__.Name`` for DataLoader
workers: forked workers inherit them, spawned workers re-run the file as ``__mp_main__``
(``__file__`` or ``__spec__`` tells multiprocessing which), as under plain Python.

The program's own outcome is never swallowed: ``sys.exit(n)`` keeps ``n``, an exception
keeps its traceback (printed through ``sys.excepthook`` without modeguard's frames) and
exit status 1, Ctrl-C exits with 130.
"""

from __future__ import annotations

import os
import runpy
import sys
import traceback
from dataclasses import dataclass
from typing import Callable, List, Optional

from ._frames import _is_internal


class ProgramNotFound(Exception):
    """The script file or module to run does not exist (a usage error: exit status 2)."""


@dataclass
class Outcome:
    """How the program ended."""

    exit_status: int


def check_target(target: str, as_module: bool) -> None:
    """Fail early, with a one-line reason, when there is nothing to run."""
    if as_module:
        import importlib.util

        sys.path.insert(0, os.getcwd())
        try:
            spec = importlib.util.find_spec(target)
        except (ImportError, ValueError) as exc:  # a parent package is missing, or a bad name
            raise ProgramNotFound(f"no module named {target!r} ({exc})") from None
        finally:
            sys.path.pop(0)
        if spec is None:
            raise ProgramNotFound(f"no module named {target!r}")
    elif not os.path.exists(target):
        raise ProgramNotFound(f"can't open file {target!r}: no such file")
    elif os.path.isdir(target) and not os.path.exists(os.path.join(target, "__main__.py")):
        raise ProgramNotFound(f"can't find '__main__.py' in {target!r}")


def _exit_status(code) -> int:
    """What the interpreter makes of ``sys.exit(code)``; a message is printed like it."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF  # what the operating system keeps of it
    print(code, file=sys.stderr)
    return 1


def _show_traceback(exc: BaseException) -> None:
    """The program's traceback as Python would print it, minus the frames of
    modeguard's runner and runpy above the program's first frame."""
    tb = exc.__traceback__
    while tb is not None and _is_internal(tb.tb_frame.f_code):
        tb = tb.tb_next
    exc.__traceback__ = tb or exc.__traceback__
    try:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    except Exception:  # a broken custom hook must not hide the program's error
        traceback.print_exception(type(exc), exc, exc.__traceback__)


def run_program(target: str, args: List[str], as_module: bool = False,
                main: Optional[Callable[[], None]] = None) -> Outcome:
    """Run ``target`` (a path, or a module name with ``as_module``) with ``args`` as its
    command line. Returns the outcome; the caller decides what to report. ``main``, when
    given, is called in place of running the module (the launcher that ``_distributed``
    starts itself), with the same ``sys.argv``, ``sys.path`` and outcome handling."""
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [target, *args]  # for -m, runpy puts the module's file in argv[0]
    if as_module:
        first = os.getcwd()
    elif os.path.isdir(target):
        first = os.path.abspath(target)
    else:
        first = os.path.dirname(os.path.realpath(target))  # python resolves symlinks too
    # Replace, not prepend: modeguard's own entry (its console script's folder, or the
    # current directory under `python -m modeguard`) is not on a plain run's path.
    sys.path[0:1] = [first]
    try:
        if main is not None:
            main()
        elif as_module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(target, run_name="__main__")
        return Outcome(0)
    except SystemExit as exc:
        return Outcome(_exit_status(exc.code))
    except KeyboardInterrupt as exc:
        _show_traceback(exc)
        return Outcome(130)
    except BaseException as exc:  # the program's own error: shown, kept, never swallowed
        _show_traceback(exc)
        return Outcome(1)
    finally:
        try:
            sys.stdout.flush()
        except Exception:  # a closed stdout (piped to `head`) is the program's business
            pass
        sys.argv = saved_argv
        sys.path[:] = saved_path
