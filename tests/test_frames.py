"""modeguard._frames: Location, finding the user's frame past modeguard's, torch's and
the stdlib wrappers' own frames, to_location, stack_has_function, and the per-code-object
cache behind _is_internal.

Frames "inside" modeguard or torch come from small functions compiled with a file name in
those folders, so no package code has to be changed to put a frame there."""

import contextlib
import functools
import inspect
import os

import pytest

from modeguard import _frames as frames
from modeguard._frames import Location


def here() -> int:
    """The line of the call to here()."""
    return inspect.currentframe().f_back.f_lineno


def _compiled_in(path: str, first_line: int) -> dict:
    """Helpers whose code objects claim to live at ``path``, from ``first_line`` on (code
    objects compare equal across files, see the last test: each set gets lines of its own)."""
    source = "\n" * (first_line - 1) + (
        "from modeguard._frames import user_frame, user_code_line, user_location\n"
        "def nearest(*_args):\n"
        "    return user_frame(0)\n"
        "def call(fn, *args):\n"
        "    return fn(*args)\n"
        "def line():\n"
        "    return user_code_line(0)\n"
        "def location():\n"
        "    return user_location(0)\n"
    )
    namespace: dict = {}
    exec(compile(source, path, "exec"), namespace)
    return namespace


MODEGUARD = _compiled_in(os.path.join(frames._PKG_DIR, "_fake_internal.py"), 1)
TORCH = _compiled_in(os.path.join(frames._TORCH_DIR, "nn", "_fake_internal.py"), 101)
USER = _compiled_in(os.path.join(os.path.dirname(__file__), "_fake_user.py"), 201)


def _code_and_line(frame):
    """What a frame is running, read at once: a live frame's f_lineno moves on."""
    return frame.f_code, frame.f_lineno


@contextlib.contextmanager
def _nothing():
    yield


# ---- Location ----------------------------------------------------------------------------


def test_location_text_and_dict():
    loc = Location("/home/me/train.py", 42, "fit")
    assert str(loc) == "/home/me/train.py:42 in fit()"
    assert loc.short() == "train.py:42"
    assert loc.to_dict() == {"file": "/home/me/train.py", "line": 42, "function": "fit"}
    assert loc == Location("/home/me/train.py", 42, "fit") and hash(loc) == hash(Location("/home/me/train.py", 42, "fit"))
    with pytest.raises(AttributeError):
        loc.line = 1


# ---- user_frame ---------------------------------------------------------------------------


def test_user_frame_is_the_caller_when_the_caller_is_user_code():
    f = frames.user_frame(0)
    assert f.f_code is test_user_frame_is_the_caller_when_the_caller_is_user_code.__code__
    assert USER["nearest"]().f_code is USER["nearest"].__code__  # user code: not skipped


def test_user_frame_skips_modeguard_and_torch_frames():
    line = here() + 1
    code, lineno = _code_and_line(MODEGUARD["call"](TORCH["call"], MODEGUARD["nearest"]))
    assert code is test_user_frame_skips_modeguard_and_torch_frames.__code__
    assert lineno == line


def test_user_frame_skips_contextlib_and_functools_wrappers():
    through_contextlib = _nothing()(MODEGUARD["nearest"])  # called from contextlib's inner()
    assert through_contextlib().f_code is test_user_frame_skips_contextlib_and_functools_wrappers.__code__
    through_functools = functools.singledispatch(MODEGUARD["nearest"])  # functools.py's wrapper
    assert through_functools(1).f_code is test_user_frame_skips_contextlib_and_functools_wrappers.__code__


def test_user_frame_stops_at_the_first_user_frame_above_the_internal_ones():
    f = MODEGUARD["call"](USER["call"], MODEGUARD["nearest"])
    assert f.f_code is USER["call"].__code__


def test_user_frame_depth_counts_from_the_caller():
    def helper():
        return frames.user_frame(0), frames.user_frame(1)

    own, callers = helper()
    assert own.f_code is helper.__code__
    assert callers.f_code is test_user_frame_depth_counts_from_the_caller.__code__


def test_user_frame_past_the_top_of_the_stack_is_none():
    assert frames.user_frame(10_000) is None


# ---- frameworks (site-packages) ------------------------------------------------------------

SITE = frames._SITE_DIRS[0] if frames._SITE_DIRS else os.path.join(os.sep, "venv", "site-packages", "")
FRAMEWORK = _compiled_in(os.path.join(SITE, "fakeframework", "trainer.py"), 301)
FRAMEWORK_MODE: dict = {}
FRAMEWORK_MODE["__name__"] = "fakeframework.modes"
exec(compile("\n" * 499 + "from modeguard._frames import framework_caller\n"
             "class _ModuleMode:\n    def restore(self):\n        return framework_caller()\n",
             os.path.join(SITE, "fakeframework", "modes.py"), "exec"), FRAMEWORK_MODE)


def test_user_frame_skips_installed_frameworks_to_the_innermost_user_frame():
    line = here() + 1
    code, lineno = _code_and_line(FRAMEWORK["call"](TORCH["call"], MODEGUARD["nearest"]))
    assert (code, lineno) == (test_user_frame_skips_installed_frameworks_to_the_innermost_user_frame.__code__, line)
    # The user's own code called back by the framework (a training_step) is the innermost.
    f = FRAMEWORK["call"](USER["call"], FRAMEWORK["call"], MODEGUARD["nearest"])
    assert f.f_code is USER["call"].__code__


def test_with_no_user_frame_the_first_non_internal_one_is_taken():
    import threading

    found = []
    # A thread's stack has no frame of this file: threading's own frames are stdlib code,
    # so build one with nothing but framework frames on top of internal ones.
    t = threading.Thread(target=lambda: found.append(FRAMEWORK["call"](MODEGUARD["nearest"])))
    t.start()
    t.join()
    f = found[0]
    assert f is not None and not frames._is_internal(f.f_code)


def test_framework_frames_are_framework_not_internal():
    assert frames._is_framework(FRAMEWORK["call"].__code__) and not frames._is_internal(FRAMEWORK["call"].__code__)
    assert frames._is_framework(TORCH["call"].__code__)
    assert not frames._is_framework(USER["call"].__code__)
    assert not frames._is_framework(test_framework_frames_are_framework_not_internal.__code__)


def test_stacklevel_lands_on_the_users_frame_past_frameworks():
    import warnings

    from modeguard.report.collect import stacklevel

    exec(compile("\n" * 599 + "import warnings\nfrom modeguard.report.collect import stacklevel\n"
                 "def warn():\n    warnings.warn('x', stacklevel=stacklevel())\n",
                 os.path.join(frames._PKG_DIR, "_fake_warn.py"), "exec"), ns := {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = here() + 1
        FRAMEWORK["call"](ns["warn"])
    assert (caught[0].filename, caught[0].lineno) == (__file__, line)


def test_framework_caller_names_the_framework_function_or_none_for_user_code():
    assert FRAMEWORK_MODE["_ModuleMode"]().restore() == "_ModuleMode.restore (fakeframework)"
    assert frames.framework_caller() is None  # called from this test: the user's code


# ---- code lines and locations ----------------------------------------------------------------


def test_user_code_line_and_to_location():
    line = here() + 1
    code, lineno = MODEGUARD["line"]()
    assert code is test_user_code_line_and_to_location.__code__ and lineno == line
    assert frames.to_location((code, lineno)) == Location(__file__, line, "test_user_code_line_and_to_location")
    assert frames.to_location(None) is None


def test_user_location_points_at_the_users_line():
    line = here() + 1
    loc = TORCH["call"](MODEGUARD["location"])
    assert loc == Location(__file__, line, "test_user_location_points_at_the_users_line")


# ---- stack_has_function -------------------------------------------------------------------------


def test_stack_has_function_by_name_and_file():
    def update_bn():
        return (
            frames.stack_has_function({"update_bn"}),
            frames.stack_has_function({"update_bn", "other"}, os.path.basename(__file__)),
            frames.stack_has_function({"update_bn"}, "torch" + os.sep + "optim"),
        )

    assert update_bn() == (True, True, False)
    assert not frames.stack_has_function({"update_bn"})  # not on the stack any more
    assert frames.stack_has_function({"test_stack_has_function_by_name_and_file"})


# ---- _is_internal -------------------------------------------------------------------------------


@pytest.fixture
def fresh_cache(monkeypatch):
    monkeypatch.setattr(frames, "_internal_cache", {})
    return frames._internal_cache


def _code_at(path):
    return compile("pass", path, "exec")


@pytest.mark.parametrize("path, internal", [
    (os.path.join(frames._PKG_DIR, "_guard.py"), True),
    (os.path.join(frames._TORCH_DIR, "nn", "modules", "module.py"), True),
    (os.path.join(frames._WRAPT_DIR, "wrappers.py"), True),
    (frames._STDLIB_WRAPPERS[0], True),  # contextlib.py
    (os.path.join(os.sep, "usr", "lib", "python3", "runpy.py"), True),
    ("<frozen runpy>", True),
    (os.path.join(frames._PKG_DIR, "demo.py"), False),  # the bundled demo is user code
    (__file__, False),
    ("<ipython-input-3-abc>", False),
    ("<string>", False),
    (os.path.join(os.sep, "home", "me", "modeguard_experiments", "train.py"), False),
], ids=lambda v: os.path.basename(v) if isinstance(v, str) else str(v))
def test_is_internal(fresh_cache, path, internal):
    assert frames._is_internal(_code_at(path)) is internal


def test_is_internal_answers_once_per_file(fresh_cache):
    code = _code_at(__file__)
    assert frames._is_internal(code) is False
    assert fresh_cache == {__file__: False}
    fresh_cache[__file__] = True  # the cache, not the path, answers from now on
    assert frames._is_internal(code) is True
    other = compile("x = 1", __file__, "exec")  # another code object of the same file
    assert frames._is_internal(other) is True and len(fresh_cache) == 1


def test_equal_code_from_a_user_file_and_from_modeguard_are_told_apart(fresh_cache):
    source = "def helper():\n    return 1\n"
    user = compile(source, os.path.join(os.sep, "home", "me", "train.py"), "exec").co_consts[0]
    ours = compile(source, os.path.join(frames._PKG_DIR, "_guard.py"), "exec").co_consts[0]
    assert frames._is_internal(user) is False
    assert frames._is_internal(ours) is True
