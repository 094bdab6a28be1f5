"""_distributed.py: ``modeguard run`` under several ranks (per-rank JSON reports, the rank
in the summary, the exit status explained) and ``modeguard run -m torch.distributed.run``.

One real launch of torchrun's two workers (tests/scripts/ddp_train.py, the classic
rank-0-only validation bug) checks it end to end; the rest runs in-process, with the
variables torchrun sets (RANK, WORLD_SIZE, TORCHELASTIC_ERROR_FILE) set by the test.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from modeguard import _auto as auto, _cli as cli, _distributed as distributed
from modeguard.observe import modes
from modeguard.report.schema import validate

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(HERE, "scripts")
BUG = os.path.join(SCRIPTS, "validate_bug.py")
DDP_TRAIN = os.path.join(SCRIPTS, "ddp_train.py")
RANK_VARS = ("RANK", "WORLD_SIZE", "TORCHELASTIC_ERROR_FILE", "TORCHELASTIC_USE_AGENT_STORE", "MODEGUARD")


def _line_of(path, marker):
    with open(path) as fh:
        return next(n for n, line in enumerate(fh, 1) if marker in line)


@pytest.fixture
def run(monkeypatch, capsys):
    """cli.main(["run", ...]) in-process as rank ``rank`` of ``world``."""
    for name in RANK_VARS:
        monkeypatch.delenv(name, raising=False)

    def _run(*args, rank=None, world=None):
        if rank is not None:
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", str(world))
        else:
            monkeypatch.delenv("RANK", raising=False)
            monkeypatch.delenv("WORLD_SIZE", raising=False)
        status = cli.main(["run", *args])
        out, err = capsys.readouterr()
        return status, out, err

    yield _run
    assert not auto.active() and not modes.is_patched()


# ---- rank, report path ------------------------------------------------------------------


def test_rank_info_comes_from_torchruns_variables(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.rank_info() == distributed.RankInfo(0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    info = distributed.rank_info()
    assert info == distributed.RankInfo(3, 4) and info.several and str(info) == "rank 3 of 4"
    for rank, world in (("x", "4"), ("4", "4"), ("0", "")):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", world)
        assert distributed.rank_info() == distributed.RankInfo(0, 1), (rank, world)


@pytest.mark.parametrize("path, rank, world, expected", [
    ("out.json", 0, 1, "out.json"),
    ("out.json", 1, 2, "out.rank1.json"),
    ("runs/out.json", 0, 2, os.path.join("runs", "out.rank0.json")),
    ("report", 3, 4, "report.rank3"),
    ("mg-{rank}.json", 1, 2, "mg-1.json"),
    ("r{rank}/mg.json", 0, 1, "r0/mg.json"),
])
def test_report_path_per_rank(path, rank, world, expected):
    assert distributed.report_path(path, distributed.RankInfo(rank, world)) == expected


# ---- modeguard run as one rank of several (in-process) ------------------------------------


def test_each_rank_writes_its_own_json_report_with_rank_fields(run, tmp_path):
    reports = {}
    for rank in (0, 1):
        status, _, err = run("--report-json", str(tmp_path / "out.json"), BUG, rank=rank, world=2)
        assert status == 3, err
        reports[rank] = json.loads((tmp_path / f"out.rank{rank}.json").read_text())
    assert not (tmp_path / "out.json").exists()
    for rank, report in reports.items():
        assert validate(report) == []
        assert (report["rank"], report["world_size"]) == (rank, 2)
        assert [v["code"] for v in report["violations"]] == ["MG101"]


def test_rank_placeholder_in_the_report_path(run, tmp_path):
    status, _, _ = run("--report-json", str(tmp_path / "mg-{rank}.json"), BUG, rank=1, world=2)
    assert status == 3
    assert json.loads((tmp_path / "mg-1.json").read_text())["rank"] == 1
    status, _, _ = run("--report-json", str(tmp_path / "single-{rank}.json"), "--fail-on", "never", BUG)
    assert status == 0
    single = json.loads((tmp_path / "single-0.json").read_text())
    assert (single["rank"], single["world_size"]) == (0, 1)


def test_a_single_process_report_keeps_its_path_and_says_rank_0_of_1(run, tmp_path):
    out = tmp_path / "out.json"
    run("--report-json", str(out), BUG)
    report = json.loads(out.read_text())
    assert validate(report) == [] and (report["rank"], report["world_size"]) == (0, 1)


def test_the_summary_names_the_rank_and_ends_with_who_set_the_status(run):
    status, _, err = run(BUG, rank=1, world=2)
    assert status == 3
    lines = err.rstrip("\n").splitlines()
    assert lines[0].startswith("modeguard (rank 1 of 2): 1 error, 0 warning, 0 info in ")
    assert lines[-1] == ("modeguard (rank 1 of 2): exit status 3, set by modeguard, not by the program "
                         "(which exited 0): violations at or above --fail-on error (MG101 step-in-eval).")


def test_a_rank_with_its_own_status_says_so(run):
    status, _, err = run("--fail-on", "never", BUG, rank=0, world=2)
    assert status == 0
    assert err.rstrip("\n").splitlines()[-1] == "modeguard (rank 0 of 2): exit status 0 (the program's own)."


def test_the_summary_is_written_in_one_piece(run, monkeypatch):
    class Recorder:
        def __init__(self):
            self.writes = []

        def write(self, text):
            self.writes.append(text)

        def flush(self):
            pass

        def isatty(self):
            return False

    rec = Recorder()
    monkeypatch.setattr(sys, "stderr", rec)
    run(BUG, rank=0, world=2)
    (summary,) = [w for w in rec.writes if "modeguard (rank 0 of 2)" in w]
    assert summary.startswith("modeguard (rank 0 of 2): 1 error") and "MG101 step-in-eval [error]" in summary
    assert summary.rstrip("\n").endswith("(MG101 step-in-eval).")


def test_the_status_modeguard_sets_is_explained_to_torchelastic(run, tmp_path, monkeypatch):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    status, _, _ = run(BUG, rank=1, world=2)
    assert status == 3
    data = json.loads(error_file.read_text())
    text = data["message"]["extraInfo"]["py_callstack"]
    assert text.startswith("modeguard (rank 1 of 2): exit status 3, set by modeguard")
    assert data["message"]["message"] == text and int(data["message"]["extraInfo"]["timestamp"]) > 0
    # torch reads it back as the failure's message (what ChildFailedError shows).
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    failure = ProcessFailure(local_rank=1, pid=1, exitcode=3, error_file=str(error_file))
    assert failure.message["extraInfo"]["py_callstack"] == text


def test_a_file_the_program_wrote_itself_is_left_alone(run, tmp_path, monkeypatch):
    error_file = tmp_path / "error.json"
    error_file.write_text('{"message": "the program\'s own"}')
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    assert run(BUG, rank=1, world=2)[0] == 3
    assert error_file.read_text() == '{"message": "the program\'s own"}'
    # Nor is one written when the program's own status stands.
    error_file.unlink()
    assert run("--fail-on", "never", BUG, rank=1, world=2)[0] == 0
    assert not error_file.exists()


def test_end_of_rank_outside_torchelastic_returns_at_once(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    distributed.end_of_rank(distributed.RankInfo(0, 2), failing=True, timeout=1000)
    # An agent store that cannot be reached ends the wait too.
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "not-a-port")
    distributed.end_of_rank(distributed.RankInfo(0, 2), failing=True, timeout=1000)


# ---- following torch.distributed.run's workers (rewrite, in-process) --------------------


def _worker_command(launcher_args, run_options, monkeypatch):
    """What torchrun would run for each worker once modeguard rewrote its arguments."""
    from torch.distributed import run as launcher

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # config_from_args sets it otherwise
    launch = distributed.Launch()
    args = launcher.parse_args(launcher_args)
    distributed._rewrite(args, run_options, launch)
    _, cmd, cmd_args = launcher.config_from_args(args)
    return launch, [cmd, *cmd_args]


def test_each_worker_runs_under_modeguard_run_with_the_same_options(monkeypatch):
    monkeypatch.delenv("PYTHON_EXEC", raising=False)
    launch, cmd = _worker_command(["--nproc_per_node=2", "train.py", "--lr", "0.1"],
                                  ["--fail-on", "warning", "-q"], monkeypatch)
    assert launch.followed
    assert cmd == [sys.executable, "-u", "-m", "modeguard", "run", "--fail-on", "warning", "-q", "train.py", "--lr", "0.1"]


def test_a_module_worker_and_torchruns_python_exec(monkeypatch):
    monkeypatch.setenv("PYTHON_EXEC", "/opt/py/bin/python")
    _, cmd = _worker_command(["--nproc_per_node=2", "-m", "pkg.train", "x"], [], monkeypatch)
    assert cmd == ["/opt/py/bin/python", "-u", "-m", "modeguard", "run", "-m", "pkg.train", "x"]


def test_run_path_workers_are_followed_too(monkeypatch):
    monkeypatch.delenv("PYTHON_EXEC", raising=False)
    _, cmd = _worker_command(["--run-path", "/abs/train.py"], [], monkeypatch)
    assert cmd == [sys.executable, "-u", "-m", "modeguard", "run", "/abs/train.py"]


def test_no_python_workers_are_left_as_they_are(monkeypatch):
    launch, cmd = _worker_command(["--no-python", "modeguard", "run", "train.py"], [], monkeypatch)
    assert launch.followed and cmd == ["modeguard", "run", "train.py"]  # they check themselves
    launch, cmd = _worker_command(["--no-python", "bash", "job.sh"], [], monkeypatch)
    assert not launch.followed and cmd == ["bash", "job.sh"]
    launch.started = launch.finished = True
    head, status, tail = distributed.launch_summary(launch, 0, "error", 3)
    assert "ran 'bash' directly (--no-python)" in head and "were not checked" in head
    assert status == 0 and "checking is off" not in head + tail


def test_the_launcher_exits_3_when_a_worker_did_for_violations():
    launch = distributed.Launch(started=True, finished=True, failures={1: 3})
    head, status, tail = distributed.launch_summary(launch, 1, "error", 3)
    assert head.endswith("each rank printed its own summary.")
    assert distributed.launch_summary(launch, 1, "error", 3, "r/mg-{rank}.json")[0].endswith(
        "each rank printed its own summary and wrote its own JSON report (r/mg-<N>.json).")
    assert status == 3
    assert tail == "modeguard: exit status 3: rank 1 exited 3 for violations at or above --fail-on error (the launcher exited 1)."
    # A worker that failed on its own keeps the launcher's status.
    failed_alone = distributed.Launch(started=True, finished=True, failures={0: 1})
    assert distributed.launch_summary(failed_alone, 1, "error", 3)[1] == 1
    assert distributed.launch_summary(distributed.Launch(started=True, finished=True), 0, "error", 3)[1:] == (
        0, "modeguard: exit status 0 (the launcher's own).")
    # The launcher itself failed (a rendezvous error): nothing is claimed about workers.
    head, status, _ = distributed.launch_summary(distributed.Launch(started=True, failures={1: 3}), 1, "error", 3)
    assert status == 1 and head.startswith("modeguard: torch.distributed.run failed (see above)")


def test_bad_launcher_arguments_exit_2_with_torchruns_usage_and_no_claim(run, capsys):
    status, _, err = run("-m", "torch.distributed.run", "--nproc_per_node=2")
    assert status == 2
    assert "the following arguments are required: training_script" in err
    assert err.rstrip("\n").splitlines()[-2:] == [
        "modeguard: torch.distributed.run launched no worker; nothing was checked.",
        "modeguard: exit status 2 (the launcher's own).",
    ]


def test_a_bare_torchrun_is_pointed_at_the_launcher_module(run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        run("torchrun", "--nproc_per_node=2", "train.py")
    assert exc.value.code == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert "can't open file 'torchrun'" in line and "modeguard run -m torch.distributed.run" in line


def test_the_launcher_is_recognised_by_module_and_console_script():
    assert distributed.is_launcher("torch.distributed.run", None)
    assert distributed.is_launcher(None, "/usr/bin/torchrun")
    assert not distributed.is_launcher("torch.distributed.launch", None)
    assert not distributed.is_launcher(None, "train.py")


# ---- end to end: modeguard run -m torch.distributed.run (one real launch) ---------------


@pytest.fixture(scope="module")
def torchrun(tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in (*RANK_VARS, "MODEGUARD_RULES", "MODEGUARD_FAIL_ON", "FORCE_COLOR"):
        env.pop(name, None)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "modeguard", "run", "--report-json", str(out / "out.json"),
             "-m", "torch.distributed.run", "--nproc_per_node=2", "--monitor-interval=0.1", "ddp_train.py"],
            capture_output=True, text=True, cwd=SCRIPTS, env=env, timeout=240,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("modeguard run -m torch.distributed.run did not finish within 240 s")
    return proc, out


def _summary(err, rank):
    """Rank ``rank``'s summary: from its header to its status line."""
    me = f"modeguard (rank {rank} of 2): "
    start = err.index(me)
    end = err.index(me + "exit status", start)
    return err[start:err.index("\n", end)]


def test_wrapping_the_launcher_watches_every_worker(torchrun):
    proc, out = torchrun
    err = proc.stderr
    assert "rank 0 trained" in proc.stdout and "rank 1 trained" in proc.stdout
    assert proc.returncode == 3, err[-3000:]
    assert "checking is off" not in err
    assert "in -m torch.distributed.run" not in err  # no summary of the launcher as a program
    head, tail = err.rstrip("\n").splitlines()[-2:]
    assert head == (f"modeguard: torch.distributed.run ran its workers under modeguard run; each rank printed its own "
                    f"summary and wrote its own JSON report ({out / 'out.rank<N>.json'}).")
    # Both ranks exit 3; torchelastic may stop the later one while Python shuts it down,
    # after its report is written (the tests below read both), so it may count as stopped.
    assert re.fullmatch(r"modeguard: exit status 3: (rank [01]|ranks 0, 1) exited 3 for violations at or above "
                        r"--fail-on error \(the launcher exited 1\)\.", tail), tail
    zero, one = _summary(err, 0), _summary(err, 1)
    assert zero.startswith("modeguard (rank 0 of 2): 2 error, 0 warning, 0 info in ddp_train.py "
                           "(models watched: DistributedDataParallel, DistributedDataParallel.module)")
    assert one.startswith("modeguard (rank 1 of 2): 1 error, 0 warning, 0 info in ddp_train.py")
    mode_line = _line_of(DDP_TRAIN, "MODE-SET-LINE")
    assert "MG101 step-in-eval" in zero and "MG501 ranks-disagree" in zero
    assert f"Sequential.eval() at ddp_train.py:{mode_line}" in one  # where the other rank set it
    assert "MG101" not in one


def test_each_rank_summary_is_one_unbroken_piece(torchrun):
    err = torchrun[0].stderr
    for rank, other in ((0, 1), (1, 0)):
        block = _summary(err, rank)
        assert f"rank {other} of 2" not in block and f"(rank {other})" not in block


def test_each_rank_says_it_set_the_exit_status_and_torchrun_repeats_it(torchrun):
    err = torchrun[0].stderr
    assert _summary(err, 0).splitlines()[-1] == (
        "modeguard (rank 0 of 2): exit status 3, set by modeguard, not by the program (which exited 0): "
        "violations at or above --fail-on error (MG101 step-in-eval, MG501 ranks-disagree).")
    assert _summary(err, 1).splitlines()[-1].endswith("(MG501 ranks-disagree).")
    # torchrun's ChildFailedError shows the rank's own words, not "error_file: <N/A>".
    failure = err[err.index("ChildFailedError"):]
    assert re.search(r"traceback : modeguard \(rank [01] of 2\): exit status 3, set by modeguard", failure)


def test_per_rank_json_reports_from_the_launched_workers(torchrun):
    _, out = torchrun
    assert sorted(p.name for p in out.iterdir()) == ["out.rank0.json", "out.rank1.json"]
    step_line = _line_of(DDP_TRAIN, "STEP-LINE")
    found = {}
    for rank in (0, 1):
        report = json.loads((out / f"out.rank{rank}.json").read_text())
        assert validate(report) == [], rank
        assert (report["rank"], report["world_size"], report["script"]) == (rank, 2, "ddp_train.py")
        found[rank] = {v["code"]: v for v in report["violations"]}
    assert sorted(found[0]) == ["MG101", "MG501"] and sorted(found[1]) == ["MG501"]
    for rank in (0, 1):
        mg501 = found[rank]["MG501"]
        assert mg501["model"] == f"DistributedDataParallel (rank {rank})"
        assert mg501["modules"] == ["module.1", "module.3"]
        assert mg501["location"]["line"] == step_line
