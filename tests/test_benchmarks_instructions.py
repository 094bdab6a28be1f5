"""The callgrind instruction counts (``python -m benchmarks.instructions``): reading the
dumps, the medians and ranges over hash seeds, the target check, bad arguments, and one
real measurement under valgrind where valgrind is installed. That one takes longer than
the rest of the suite together: it is marked ``bench`` and runs in ``make bench-test``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import instructions

ROOT = Path(__file__).resolve().parents[1]


def _part(key, seed, train, evalf, workload="mlp", findings=0):
    return {"workload": workload, "key": key, "seed": seed, "n_modules": 11, "findings": findings,
            "per_step": {"train": train, "eval": evalf}}


def test_dump_total_reads_the_summary_line(tmp_path):
    dump = tmp_path / "cg.1"
    dump.write_text("version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nsummary: 123456\ntotals: 123999\n")
    assert instructions.dump_total(str(dump)) == 123456
    other = tmp_path / "notes.txt"
    other.write_text("totals: 5\n")
    with pytest.raises(ValueError, match="no 'summary:' line"):
        instructions.dump_total(str(other))


def test_summarise_takes_medians_over_seeds_and_the_extremes():
    parts = []
    for seed, jitter in enumerate((0, 3000, -2000)):
        parts += [
            _part("baseline", seed, 1_000_000 + jitter, 200_000 + jitter),
            _part("watch", seed, 1_020_000 + jitter, 210_000 + jitter),
            _part("auto", seed, 1_025_000 + jitter, 205_000 + jitter),
            _part("naive", seed, 1_150_000 + jitter, 300_000 + jitter, findings=1),
        ]
    (row,) = instructions.summarise(parts)
    assert row["seeds"] == [0, 1, 2]
    assert row["findings"] == {"baseline": 0, "watch": 0, "auto": 0, "naive": 3}
    train = row["phases"]["train"]
    base, watch = train["setups"]["baseline"], train["setups"]["watch"]
    assert (base["median"], base["min"], base["max"]) == (1_000_000, 998_000, 1_003_000)
    assert watch["added"] == 20_000
    assert (watch["added_low"], watch["added_high"]) == (15_000, 25_000)
    assert train["of_naive"]["watch"]["median"] == pytest.approx(20_000 / 150_000)
    assert train["of_naive"]["watch"]["worst"] == pytest.approx(25_000 / 145_000)
    assert row["phases"]["eval"]["of_naive"]["auto"]["median"] == pytest.approx(5_000 / 100_000)

    (t_train, t_eval) = instructions.targets([row])
    assert t_train["met"] and t_eval["met"]
    assert t_train["worst"] == pytest.approx(30_000 / 145_000)  # auto, at its worst


def test_target_is_missed_when_modeguard_adds_more_than_a_fifth():
    parts = [_part("baseline", 0, 1_000_000, 100_000), _part("watch", 0, 1_050_000, 101_000),
             _part("auto", 0, 1_010_000, 101_000), _part("naive", 0, 1_200_000, 200_000)]
    rows = instructions.summarise(parts)
    t_train, t_eval = instructions.targets(rows)
    assert t_train["watch"] == pytest.approx(0.25) and not t_train["met"]
    assert t_eval["met"]
    text = instructions.markdown({
        "meta": {"date": "d", "total_seconds": 1, "valgrind": "valgrind-x", "platform": "p", "torch": "t",
                 "python": "3", "modeguard": "0", "modeguard_commit": "c", "fixed_layout": True},
        "steps": 8, "seeds": [0], "rows": rows, "targets": [t_train, t_eval],
    })
    assert "| mlp | train | 0.250 | 0.050 | 0.250 | no |" in text
    assert "+50,000 (+50,000 to +50,000)" in text
    assert "randomisation off (setarch -R)" in text


def test_the_cost_of_a_sampled_eval_forward_is_the_difference_of_the_mode_change_phases():
    def part(key, seed, off, on):
        p = _part(key, seed, 1_200_000 if key == "naive" else 1_000_000, 300_000 if key == "naive" else 200_000)
        p["per_step"].update(switch=off, switch_sampled=on)
        return p

    parts = [part("baseline", 0, 300_000, 300_100), part("watch", 0, 400_000, 650_000),
             part("auto", 0, 380_000, 600_000), part("naive", 0, 500_000, 500_000)]
    (row,) = instructions.summarise(parts)
    assert row["sample_cost"] == {"baseline": 100, "watch": 250_000, "auto": 220_000, "naive": 0}
    targets = instructions.targets([row])
    assert [t["phase"] for t in targets] == ["train", "eval"]  # the target is about those two
    text = instructions.markdown({
        "meta": {"date": "d", "total_seconds": 1, "valgrind": "valgrind-x", "platform": "p", "torch": "t",
                 "python": "3", "modeguard": "0", "modeguard_commit": "c", "fixed_layout": True},
        "steps": 8, "seeds": [0], "rows": [row], "targets": targets,
    })
    assert "## Evaluation forward after a mode change, sampled by MG202" in text
    assert "## MG202: one sampled eval forward" in text
    assert "| mlp (11 modules) | +100 | +250,000 | +220,000 | +0 |" in text


def test_without_valgrind_it_says_what_is_missing(monkeypatch, capsys):
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name in ("valgrind", "vgdb") else real_which(name))
    assert instructions.main(["--only", "mlp"]) == 2
    err = capsys.readouterr().err
    assert "needs valgrind and vgdb on PATH" in err and "nothing was measured" in err


@pytest.mark.parametrize("cli, argv, message", [
    ("instructions", ["--only", "resnet50"], "unknown workload 'resnet50'"),
    ("instructions", ["--setups", "watch,naive"], "--setups must include baseline"),
    ("instructions", ["--setups", "baseline,nosuch"], "'nosuch' is not a usable setup"),
    ("instructions", ["--steps", "0"], "must be at least 1"),
    ("instructions", ["--only", "lightning", "--framework-setups", "baseline,naive"],
     "'naive' is not a framework setup"),
    ("instructions", ["--only", "hf", "--framework-setups", "watch"], "must include baseline"),
    ("frameworks", ["--only", "keras"], "unknown framework workload 'keras'"),
    ("frameworks", ["--rounds", "0"], "--rounds must be at least 1"),
])
def test_bad_arguments_are_refused_with_what_was_expected(cli, argv, message, capsys):
    from benchmarks import frameworks

    main = {"instructions": instructions.main, "frameworks": frameworks.main}[cli]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.bench
@pytest.mark.skipif(shutil.which("valgrind") is None or shutil.which("vgdb") is None,
                    reason="valgrind (with vgdb) is not installed")
def test_a_real_measurement_under_callgrind(tmp_path):
    out = tmp_path / "i.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.instructions", "--only", "mlp", "--setups", "baseline,watch",
         "--steps", "3", "--seeds", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    for phase in ("train", "eval"):
        setups = row["phases"][phase]["setups"]
        # a whole MLP step is millions of instructions; watching adds thousands, not millions
        assert setups["baseline"]["median"] > 300_000
        assert 1_000 < setups["watch"]["added"] < 200_000, phase
    assert row["findings"] == {"baseline": 0, "watch": 0}


# ---- the framework workloads (lightning, hf) ------------------------------------------------

def _fw_part(workload, key, train, seed=0, findings=0):
    return {"workload": workload, "key": key, "seed": seed, "n_modules": 7, "findings": findings,
            "per_step": {"train": train}}


def test_framework_rows_count_modeguards_own_share_of_the_step():
    from benchmarks import frameworks

    parts = [_fw_part("lightning", "baseline", 5_000_000), _fw_part("lightning", "callback", 5_060_000),
             _fw_part("lightning", "watch", 5_120_000), _fw_part("lightning", "auto", 5_150_000)]
    (row,) = frameworks.summarise(parts)
    # watch is measured against an empty callback (any callback costs the framework's hook
    # calls), automatic mode against the baseline
    assert row["own"] == {"watch": 60_000, "auto": 150_000}
    assert row["own_fraction"]["watch"] == pytest.approx(0.012)
    assert not row["met"]  # automatic mode at 3%
    text = frameworks.markdown([row])
    assert "| lightning: LightningModule around an MLP (7 modules) | 5,000,000 | +60,000 | +120,000 | +150,000 | " \
           "+60,000 (1.20%) | +150,000 (3.00%) | no |" in text
    whole = instructions.markdown({
        "meta": {"date": "d", "total_seconds": 1, "valgrind": "valgrind-x", "platform": "p", "torch": "t",
                 "python": "3", "modeguard": "0", "modeguard_commit": "c", "fixed_layout": True},
        "steps": 8, "seeds": [0], "rows": [], "targets": [], "framework_rows": [row],
    })
    assert "## Training step inside the frameworks" in whole and "one fifth" not in whole


def test_framework_window_holds_whole_steps_only():
    from benchmarks import frameworks

    sent = []
    window = frameworks.Window(3, lambda *cmd: sent.append((window.seen, cmd)))
    for _ in range(window.max_steps):
        window.step_begins()
    w = frameworks.WARMUP
    assert sent == [(w, ("instrumentation", "on")), (w + 1, ("zero",)), (w + 4, ("dump",)),
                    (w + 4, ("instrumentation", "off"))]
    assert window.closed


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", ["lightning", "hf"])
def test_framework_workloads_run_watched_and_silent(name):
    # Outside valgrind: the fit reaches the end of the window, and modeguard's callback
    # finds nothing in a correct loop.
    from benchmarks import frameworks

    sent = []
    info = frameworks.run(name, "watch", 2, lambda *cmd: sent.append(cmd))
    assert info["findings"] == 0 and info["n_modules"] == (7 if name == "lightning" else 51)
    assert sent[-2:] == [("dump",), ("instrumentation", "off")]
    assert not modeguard_patched()


def modeguard_patched():
    from modeguard.observe import modes

    return modes.is_patched()


# ---- the framework workloads' step time and calls (python -m benchmarks.frameworks) --------

def test_framework_time_rows_compare_each_round_with_its_own_baseline():
    from benchmarks import frameworks

    us = {"baseline": [1000.0, 2000.0, 1000.0], "callback": [1100.0, 2200.0, 1050.0],
          "watch": [1122.0, 2244.0, 1050.0], "auto": [1010.0, 2040.0, 1030.0]}
    calls = {"baseline": 1959.0, "callback": 2067.0, "watch": 2140.0, "auto": 2036.0}
    row = frameworks.timed_row("lightning", 300, us, calls, {k: 0 for k in us}, 7)
    # the slow second round (the machine was busy for every setup alike) moves no ratio
    assert row["ratio"]["auto"] == pytest.approx(1.02)
    assert row["ratio_range"]["auto"] == pytest.approx([1.01, 1.03])
    assert row["ratio"]["own_watch"] == pytest.approx(1.02)  # watch over the empty callback
    assert row["added_calls"] == {"baseline": 0.0, "callback": 108.0, "watch": 181.0, "auto": 77.0}
    assert row["us_per_step"]["baseline"] == 1000.0
    text = frameworks.timed_markdown([row], {"date": "d", "cpu": "c", "cpu_count": 2, "torch": "t", "python": "3",
                                             "modeguard_commit": "x"})
    assert ("| lightning: LightningModule around an MLP (7 modules), 3 rounds of 300 steps | 1,000 | "
            "1.100 (1.050 to 1.100) | 1.122 (1.050 to 1.122) | 1.020 (1.000 to 1.020) | 1.020 (1.010 to 1.030) | "
            "+108.0 | +181.0 | +77.0 |") in text


def test_framework_timer_counts_the_calls_of_the_window_only():
    from benchmarks import frameworks

    def work():
        return [abs(-i) for i in range(3)]

    def window(inside):
        timer = frameworks.Timer(calls=True)
        work()  # before the window: not counted
        timer("instrumentation", "on")
        timer("zero")
        if inside:
            work()
        timer("dump")
        work()  # after it: not counted either
        assert timer.seconds > 0
        return timer.n

    # work() itself, its list comprehension and three abs() (a type's call, range(), is
    # no call event); the rest is the monitor's own calls, the same in an empty window
    assert window(True) - window(False) == 5
