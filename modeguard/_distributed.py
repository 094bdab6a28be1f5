"""What ``modeguard run`` does differently when the program runs as several ranks.

- ``rank_info()``: this process's rank and the world size, from the ``RANK`` and
  ``WORLD_SIZE`` variables torchrun sets (or an initialized process group).
- ``report_path()``: each rank writes its own JSON report.
- ``note_for_launcher()``: when modeguard sets a rank's exit status, torchrun's
  ``ChildFailedError`` says so, through torchelastic's error file (the same file that
  ``torch.distributed.elastic.multiprocessing.errors.record`` writes for an exception).
- ``follow_launcher()``: ``modeguard run -m torch.distributed.run ARGS`` runs the launcher
  with its worker command rewritten to ``python -u -m modeguard run OPTIONS SCRIPT``, so
  every worker runs exactly as under ``torchrun -m modeguard run OPTIONS SCRIPT``. Like
  coverage.py's subprocess support, the child is set up to check itself; unlike a
  ``sitecustomize`` hook, nothing is installed, and the rewrite is made on the launcher's
  own parsed arguments (torch's ``get_args_parser``), not on the command line's text.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import List, Optional

from ._frames import _PKG_DIR

#: Modules that launch workers, as ``python -m MODULE`` runs them.
LAUNCHER_MODULES = ("torch.distributed.run",)
#: The console script of the same launcher (``modeguard run "$(which torchrun)" ...``).
LAUNCHER_SCRIPTS = ("torchrun",)


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int

    @property
    def several(self) -> bool:
        return self.world_size > 1

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


def rank_info() -> RankInfo:
    """This process's place among the ranks: torchrun's ``RANK``/``WORLD_SIZE``, else an
    initialized default process group, else rank 0 of 1."""
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if 0 <= rank < world:
            return RankInfo(rank, world)
    except (KeyError, ValueError):
        pass
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            return RankInfo(dist.get_rank(), dist.get_world_size())
    except Exception:  # a group being torn down: not distributed as far as we can tell
        pass
    return RankInfo(0, 1)


def report_path(path: str, info: RankInfo) -> str:
    """``--report-json PATH`` for this rank: ``{rank}`` in PATH replaced by the rank;
    otherwise, under several ranks, ``out.rank<N>.json`` beside ``out.json``."""
    if "{rank}" in path:
        return path.replace("{rank}", str(info.rank))
    if not info.several:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}.rank{info.rank}{ext}"


def note_for_launcher(message: str) -> None:
    """Tell torchelastic why this rank exits with modeguard's status: its
    ``ChildFailedError`` shows the error file's text. Only under a torchelastic agent
    (``TORCHELASTIC_ERROR_FILE`` set), and never over a file the program wrote itself."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path):
        return
    data = {"message": {"message": message,
                        "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
    except OSError:  # the launcher then says what it says without us
        pass


#: How long a rank that modeguard makes fail waits for the other ranks to end first:
#: torchelastic stops every worker as soon as one fails, and a rank stopped before its
#: summary loses its report.
WAIT_FOR_RANKS_S = 30.0


def end_of_rank(info: RankInfo, failing: bool, timeout: float = WAIT_FOR_RANKS_S) -> None:
    """Under a torchelastic agent, count this rank as ended in the agent's store; a rank
    about to fail (``failing``) first waits, at most ``timeout`` seconds, until every rank
    has ended. Only non-blocking store calls, and any failure (no agent store, the agent
    gone) ends the wait: the rank exits as it would have."""
    env = os.environ
    if not info.several or env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    try:
        from datetime import timedelta

        import torch.distributed as dist

        store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=5))
        key = f"modeguard/ended/{env.get('TORCHELASTIC_RUN_ID', '')}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        ended = store.add(key, 1)
        deadline = time.monotonic() + timeout
        while failing and ended < info.world_size and time.monotonic() < deadline:
            time.sleep(0.05)
            ended = store.add(key, 0)
    except Exception:
        pass


# ---- modeguard run -m torch.distributed.run ----------------------------------------------


def is_launcher(module: Optional[str], script: Optional[str]) -> bool:
    if module is not None:
        return module in LAUNCHER_MODULES
    return script is not None and os.path.basename(script) in LAUNCHER_SCRIPTS


@dataclass
class Launch:
    """What became of the launcher's workers."""

    followed: bool = True            # the workers run under modeguard
    direct: Optional[str] = None     # the program run with --no-python that modeguard cannot follow
    started: bool = False            # the launcher's arguments were valid: it went on to launch
    finished: bool = False           # its workers ended (all well, or some failed)
    failures: Optional[dict] = None  # global rank -> exit status, for the workers that failed


def _rewrite(args, run_options: List[str], launch: Launch) -> None:
    """Make each worker ``python -u -m modeguard run OPTIONS [-m] SCRIPT ARGS``."""
    if args.no_python and not args.run_path:
        program = os.path.basename(args.training_script)
        if program != "modeguard":  # `--no-python modeguard run ...` checks itself already
            launch.followed, launch.direct = False, args.training_script
        return
    script = ["-m", args.training_script] if args.module else [args.training_script]
    args.training_script_args = ["-u", "-m", "modeguard", "run", *run_options, *script, *args.training_script_args]
    # torchrun's own choice of interpreter: PYTHON_EXEC, else this one.
    args.training_script = os.getenv("PYTHON_EXEC", sys.executable)
    args.no_python, args.module, args.run_path = True, False, False


def launch_workers(launcher_args: List[str], run_options: List[str], launch: Launch) -> None:
    """Run torch.distributed.run on ``launcher_args`` as its ``main()`` would, with the
    workers under modeguard (``run_options`` are ``modeguard run``'s own options). Bad
    launcher arguments exit 2 with torchrun's own usage message."""
    from torch.distributed import run as launcher
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record

    sys.argv[0] = launcher.__file__
    args = launcher.parse_args(launcher_args)
    _rewrite(args, run_options, launch)
    launch.started = True
    try:
        record(launcher.run)(args)
        launch.finished = True
    except ChildFailedError as exc:
        launch.finished = True
        launch.failures = {rank: f.exitcode for rank, f in exc.failures.items()}
        # As torchrun shows it (its own traceback and message), without modeguard's frames.
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PKG_DIR):
            tb = tb.tb_next
        sys.excepthook(type(exc), exc, tb)
        raise SystemExit(1) from None


def launch_summary(launch: Launch, program_status: int, fail_on: str, violations_status: int,
                   report_json: Optional[str] = None) -> tuple:
    """The launcher process's own summary (each worker prints its own) and its exit
    status: ``violations_status`` when a worker exited with it, the launcher's otherwise."""
    own = f"modeguard: exit status {program_status} (the launcher's own)."
    if not launch.started:
        return "modeguard: torch.distributed.run launched no worker; nothing was checked.", program_status, own
    if not launch.finished:
        head = ("modeguard: torch.distributed.run failed (see above); any worker it launched ran under "
                "modeguard run and printed its own summary.")
        return head, program_status, own
    if not launch.followed:
        head = (f"modeguard: torch.distributed.run ran {launch.direct!r} directly (--no-python), so its workers "
                f"were not checked; launch `torchrun --no-python modeguard run SCRIPT.py` to check them.")
        return head, program_status, own
    head = "modeguard: torch.distributed.run ran its workers under modeguard run; each rank printed its own summary"
    if report_json:
        if "{rank}" in report_json:
            files = report_json.replace("{rank}", "<N>")
        else:
            stem, ext = os.path.splitext(report_json)
            files = f"{stem}.rank<N>{ext}"
        head += f" and wrote its own JSON report ({files})"
    head += "."
    failed = sorted(r for r, code in (launch.failures or {}).items() if code == violations_status)
    if not failed:
        return head, program_status, own
    who = f"rank {failed[0]}" if len(failed) == 1 else "ranks " + ", ".join(map(str, failed))
    tail = (f"modeguard: exit status {violations_status}: {who} exited {violations_status} for violations at or "
            f"above --fail-on {fail_on} (the launcher exited {program_status}).")
    return head, violations_status, tail
