"""``python -m benchmarks.instructions [--only NAMES] [--setups KEYS] [--framework-setups KEYS] [--steps N] [--seeds K] [--json PATH] [--markdown PATH]``

Instructions each setup adds per step, counted with valgrind's callgrind: the workloads and
setups of ``python -m benchmarks``, measured without timing noise; and, asked for by name
(``--only lightning,hf``), a training step inside PyTorch Lightning and the Hugging Face
Trainer (``frameworks.py``), where the window is opened and closed by a callback.

On a small model the added time is a few tens of µs, against a step whose time moves by
more than that from one timed block to the next, so a time-based comparison with the
naive design decides the one-fifth target by chance. Executed instructions do not depend
on what else the machine is doing. Each (workload, setup) runs in a process of its own
under ``valgrind --tool=callgrind --instr-atstart=no``: import and warm-up run
uninstrumented; then, per phase, the process turns instrumentation on through ``vgdb``,
zeroes the counters, runs ``--steps`` steps and dumps.

What is left to vary is incidental: CPython's hash seed, the addresses objects land at and
the history of a process shift which lookups collide in hash tables and caches, and that
moves a small model's count by thousands of instructions per step (by tens of thousands
under an unlucky seed). Address-space randomisation is turned off (``setarch -R``, on
Linux), so a rerun gives the same counts; each setup runs under ``--seeds`` hash seeds,
and the tables show the median and the spread. A process per setup, not all setups in
one process, because installing and removing a setup retags ``nn.Module``, which
reshuffles the method cache for whatever is measured next. Cyclic garbage collection is
off inside the measured window: it runs wherever allocation counts happen to put it.
Sampled checks (modeguard follows about one ordinary forward in 16 into autograd, with a
seeded RNG) are included in the average. Besides the training step and the evaluation
forward, two phases time an evaluation forward right after ``model.train();
model.eval()``: with MG202's sample of the forward's torch calls off, and with every such
forward sampled; their difference is what one sampled eval forward costs.

Valgrind emulates the CPU: torch's kernels may take other code paths than natively (no
AVX-512, for one), so baseline counts differ from a native run's; the Python code a setup
adds is the same. Needs ``valgrind`` with ``vgdb`` on PATH (``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from .report import NAIVE_FRACTION, NAMES

ORDER = ["baseline", "floor", "watch", "auto", "naive", "torcheck"]
#: train and eval as in ``python -m benchmarks``; then an evaluation forward right after a
#: mode change (``model.train(); model.eval()``, as a validate() does), once with MG202's
#: sample of the forward's torch calls off and once with every such forward sampled: the
#: difference is what one sampled eval forward costs.
PHASES = ("train", "eval", "switch", "switch_sampled")
TITLES = {
    "train": "Training step",
    "eval": "Evaluation forward",
    "switch": "Evaluation forward after a mode change, MG202's sample off",
    "switch_sampled": "Evaluation forward after a mode change, sampled by MG202",
}
#: The phases the one-fifth-of-naive target is about.
TARGET_PHASES = ("train", "eval")
WARMUP = 30  # uninstrumented steps first: Python's specialising interpreter and torch's caches settle
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _operation(w, phase):
    if phase in ("train", "eval"):
        return w.operation(phase)

    def eval_after_mode_change():
        w.model.train()
        w.model.eval()
        w.eval_forward()

    return eval_after_mode_change


def _instruments() -> list:
    from .instruments import HookFloor, all_instruments

    return sorted([i for i in all_instruments() if i.key in ORDER] + [HookFloor()], key=lambda i: ORDER.index(i.key))


# ---- the measured process (runs under valgrind) -------------------------------------------

def _child(workload_name: str, key: str, steps: int, result_path: str) -> None:
    import torch

    from . import workloads
    torch.set_num_threads(1)
    (w,) = [x for x in workloads.cpu_workloads() if x.name == workload_name]
    (inst,) = [i for i in _instruments() if i.key == key]
    pid = str(os.getpid())

    def monitor(*cmd):
        subprocess.run(["vgdb", f"--pid={pid}", *cmd], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    inst.install(w)
    try:
        for phase in PHASES:
            op = _operation(w, phase)
            w.set_phase("train" if phase == "train" else "eval")
            if phase.startswith("switch"):
                inst.sample_eval_forwards(phase == "switch_sampled")
            for _ in range(WARMUP):
                op()
            gc.collect()
            gc.disable()
            try:
                monitor("instrumentation", "on")
                op()  # once instrumented before counting: nothing first-time is counted
                monitor("zero")
                for _ in range(steps):
                    op()
                monitor("dump")
                monitor("instrumentation", "off")
            finally:
                gc.enable()
    finally:
        inst.uninstall(w)
    with open(result_path, "w") as f:
        json.dump({"phases": list(PHASES), "findings": inst.violations(), "n_modules": w.n_modules}, f)


# ---- the driver ----------------------------------------------------------------------------

def dump_total(path: str) -> int:
    """The instruction count of a callgrind dump (its ``summary:`` line)."""
    with open(path) as f:
        for line in f:
            if line.startswith("summary:"):
                return int(line.split()[1])
    raise ValueError(f"{path}: no 'summary:' line; is it a callgrind dump?")


def fixed_layout() -> bool:
    """Whether processes can run with address-space randomisation off (``setarch -R``).
    With it on, the addresses that C++ hash maps (the autograd engine's among them) and
    id()-keyed dicts hash differ from run to run, and so do the counts, by thousands of
    instructions per step; with it off, a rerun gives the same counts exactly."""
    return sys.platform.startswith("linux") and shutil.which("setarch") is not None


def measure(workload_name: str, key: str, seed: int, steps: int, workdir: str) -> dict:
    """Instructions per step, by phase, of one setup of one workload under one hash seed."""
    tag = f"{workload_name}.{key}.{seed}"
    out = os.path.join(workdir, f"cg.{tag}")
    result_path = os.path.join(workdir, f"result.{tag}.json")
    cmd = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", "--vgdb=yes", f"--callgrind-out-file={out}",
        sys.executable, "-m", "benchmarks.instructions", "--child", workload_name, key, str(steps), result_path,
    ]
    if fixed_layout():
        cmd = ["setarch", platform.machine(), "-R"] + cmd
    env = dict(os.environ, PYTHONHASHSEED=str(seed))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not os.path.exists(result_path):
        raise RuntimeError(f"{tag}: the measured process failed:\n{proc.stderr[-3000:]}")
    with open(result_path) as f:
        info = json.load(f)
    return {"workload": workload_name, "key": key, "seed": seed, "n_modules": info["n_modules"],
            "findings": info["findings"],
            "per_step": {ph: dump_total(f"{out}.{i}") / steps for i, ph in enumerate(info["phases"], start=1)}}


def summarise(parts: list) -> list:
    """One row per workload from the per-process measurements: per phase and setup the
    median over seeds and its range; added instructions against the baseline's median;
    modeguard's added work as a fraction of the naive design's, at the medians and at the
    least favourable ends of the ranges."""
    rows = []
    for name in dict.fromkeys(p["workload"] for p in parts):
        mine = [p for p in parts if p["workload"] == name]
        keys = [k for k in ORDER if any(p["key"] == k for p in mine)]
        row = {"workload": name, "n_modules": mine[0]["n_modules"], "seeds": sorted({p["seed"] for p in mine}),
               "findings": {k: sum(p["findings"] for p in mine if p["key"] == k) for k in keys}, "phases": {}}
        for phase in [ph for ph in PHASES if all(ph in p["per_step"] for p in mine)]:
            counts = {k: sorted(p["per_step"][phase] for p in mine if p["key"] == k) for k in keys}
            med = {k: statistics.median(v) for k, v in counts.items()}
            base = counts["baseline"]
            cols = {k: {"median": med[k], "min": v[0], "max": v[-1], "added": med[k] - med["baseline"],
                        # the added count if this setup's worst seed met the baseline's best
                        "added_high": v[-1] - base[0], "added_low": v[0] - base[-1]}
                    for k, v in counts.items()}
            of_naive = {}
            naive = cols.get("naive")
            if naive and naive["added"] > 0:
                for k in ("watch", "auto"):
                    if k in cols:
                        of_naive[k] = {"median": cols[k]["added"] / naive["added"],
                                       "worst": cols[k]["added_high"] / max(naive["added_low"], 1.0)}
            row["phases"][phase] = {"setups": cols, "of_naive": of_naive}
        if "switch" in row["phases"] and "switch_sampled" in row["phases"]:
            # What one eval forward sampled by MG202 adds, per setup and seed-wise medians.
            off, on = row["phases"]["switch"]["setups"], row["phases"]["switch_sampled"]["setups"]
            row["sample_cost"] = {k: on[k]["median"] - off[k]["median"] for k in keys}
        rows.append(row)
    return rows


def targets(rows: list) -> list:
    out = []
    for row in rows:
        for phase, ph in row["phases"].items():
            if phase not in TARGET_PHASES:
                continue
            of = ph["of_naive"]
            if "watch" in of and "auto" in of:
                out.append({"workload": row["workload"], "phase": phase,
                            "watch": of["watch"]["median"], "auto": of["auto"]["median"],
                            "worst": max(of["watch"]["worst"], of["auto"]["worst"]),
                            "met": max(of["watch"]["median"], of["auto"]["median"]) <= NAIVE_FRACTION})
    return out


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        "# modeguard overhead in executed instructions (callgrind)",
        "",
        f"- date: {meta['date']}; total run time {meta['total_seconds']} s",
        f"- {meta['valgrind']}, {meta['platform']}; torch {meta['torch']}, Python {meta['python']}, "
        f"modeguard {meta['modeguard']} (commit {meta['modeguard_commit']})",
        f"- {result['steps']} steps per measurement, one torch thread, each setup in its own process "
        f"under {len(result['seeds'])} hash seeds ({', '.join(map(str, result['seeds']))}), address-space "
        f"randomisation {'off (setarch -R): a rerun gives the same counts' if meta.get('fixed_layout') else 'on'}",
        "",
        "Instructions per step (median over the seeds). Added = the setup's median minus the "
        "baseline's, with the range it could take between the seeds' extremes. The baseline's "
        "range is the noise floor: what the hash seed alone moves.",
        "",
    ]
    for phase in [ph for ph in PHASES if result["rows"] and ph in result["rows"][0]["phases"]]:
        title = TITLES[phase]
        keys = [k for k in ORDER if k in result["rows"][0]["phases"][phase]["setups"]]
        added = [k for k in keys if k != "baseline"]
        lines += [f"## {title}", "",
                  "| workload | baseline (range) | " + " | ".join(f"{NAMES[k]} added (range)" for k in added)
                  + " | watch / naive | run / naive |",
                  "|" + "---|" * (4 + len(added))]
        for row in result["rows"]:
            ph = row["phases"][phase]
            c = ph["setups"]
            b = c["baseline"]
            cells = [f"{b['median']:,.0f} ({b['min']:,.0f} to {b['max']:,.0f})"]
            cells += [f"{c[k]['added']:+,.0f} ({c[k]['added_low']:+,.0f} to {c[k]['added_high']:+,.0f})" for k in added]
            cells += [f"{ph['of_naive'][k]['median']:.3f}" if k in ph["of_naive"] else "n/a" for k in ("watch", "auto")]
            lines.append(f"| {row['workload']} ({row['n_modules']} modules) | " + " | ".join(cells) + " |")
        lines.append("")
    costed = [row for row in result["rows"] if row.get("sample_cost")]
    if costed:
        keys = [k for k in ORDER if k in costed[0]["sample_cost"]]
        lines += ["## MG202: one sampled eval forward", "",
                  "MG202 looks at the torch calls of the first eval-mode forward of a model after each "
                  "mode change (its first 16 such forwards, then one in 16), never at a training step, "
                  "so the evaluation forward above pays it only in its warm-up. What one sampled forward "
                  "adds: the median of the sampled phase minus that of the same phase with the sample off "
                  "(the setups without modeguard do the same work in both: their difference is noise).", "",
                  "| workload | " + " | ".join(NAMES[k] for k in keys) + " |", "|" + "---|" * (1 + len(keys))]
        for row in costed:
            c = row["sample_cost"]
            lines.append(f"| {row['workload']} ({row['n_modules']} modules) | " + " | ".join(f"{c[k]:+,.0f}" for k in keys) + " |")
        lines.append("")
    if result.get("framework_rows"):
        from . import frameworks

        lines += frameworks.markdown(result["framework_rows"]).splitlines() + [""]
    if not result["targets"]:
        return "\n".join(lines) + "\n"
    lines += ["## Target: modeguard's added work at most one fifth of the naive design's", "",
              "Worst = the larger of the two modeguard fractions with modeguard at the top of its range "
              "and the naive design at the bottom of its.", "",
              "| workload | phase | modeguard.watch / naive | modeguard run / naive | worst | met |", "|---|---|---|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['workload']} | {t['phase']} | {t['watch']:.3f} | {t['auto']:.3f} | {t['worst']:.3f} | "
                     f"{'yes' if t['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def _framework_child(workload_name: str, key: str, steps: int, result_path: str) -> None:
    from . import frameworks

    pid = str(os.getpid())

    def monitor(*cmd):
        subprocess.run(["vgdb", f"--pid={pid}", *cmd], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    info = frameworks.run(workload_name, key, steps, monitor)
    with open(result_path, "w") as f:
        json.dump({"phases": ["train"], **info}, f)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        from . import frameworks

        child = _framework_child if argv[1] in frameworks.NAMES else _child
        child(argv[1], argv[2], int(argv[3]), argv[4])
        return 0
    from . import frameworks

    usable = [i.key for i in _instruments() if i.available() is None]
    p = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description="Instructions each setup adds per step, counted with callgrind (needs valgrind).")
    # The MLP by default: it is where timing cannot decide, and it is quick under valgrind.
    # The ResNet's convolutions run so slowly there that one setup takes over ten minutes.
    # The framework workloads (lightning, hf) have their own setups and take minutes per
    # process under valgrind (the frameworks' imports alone): asked for by name only.
    p.add_argument("--only", metavar="NAMES", default="mlp",
                   help="comma-separated workloads: CPU ones (default: mlp; resnet18 takes over ten minutes per "
                        "setup and seed) and the framework steps lightning, hf")
    default = [k for k in usable if k != "torcheck"]  # torcheck's cost is in the timing tables
    p.add_argument("--setups", metavar="KEYS", default=",".join(default),
                   help=f"comma-separated setups, baseline included, of {','.join(usable)} (default: {','.join(default)})")
    p.add_argument("--framework-setups", metavar="KEYS", default=",".join(frameworks.ORDER),
                   help=f"setups for lightning and hf, baseline included (default: {','.join(frameworks.ORDER)})")
    p.add_argument("--steps", type=int, default=24, help="steps per measurement (default 24)")
    p.add_argument("--seeds", type=int, default=3, help="hash seeds per setup (default 3)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes at once (default: one per core)")
    p.add_argument("--json", metavar="PATH", help="write the numbers as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the tables as markdown")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    keys = [k for k in args.setups.split(",") if k]
    from . import workloads

    fw_keys = [k for k in args.framework_setups.split(",") if k]
    known = [w.name for w in workloads.cpu_workloads()] + list(frameworks.NAMES)
    for n in names:
        if n not in known:
            p.error(f"--only: unknown workload {n!r}; expected some of {', '.join(known)}")
    for k in keys:
        if k not in usable:
            p.error(f"--setups: {k!r} is not a usable setup here; expected some of {', '.join(usable)}")
    for k in fw_keys:
        if k not in frameworks.ORDER:
            p.error(f"--framework-setups: {k!r} is not a framework setup; expected some of {', '.join(frameworks.ORDER)}")
    if "baseline" not in keys or "baseline" not in fw_keys:
        p.error("--setups must include baseline: the other setups are measured against it")
    plain = [n for n in names if n not in frameworks.NAMES]
    framed = [n for n in names if n in frameworks.NAMES]
    if args.steps < 1 or args.seeds < 1 or args.jobs < 1:
        p.error("--steps, --seeds and --jobs must be at least 1")
    missing = [t for t in ("valgrind", "vgdb") if shutil.which(t) is None]
    if missing:
        print(f"python -m benchmarks.instructions needs {' and '.join(missing)} on PATH "
              f"(apt-get install valgrind); nothing was measured.", file=sys.stderr)
        return 2

    from .__main__ import machine_info

    started = time.perf_counter()
    meta = machine_info(threads=1)
    seeds = list(range(args.seeds))
    combos = [(n, k) for n in plain for k in keys] + [(n, k) for n in framed for k in fw_keys]
    print(f"callgrind: {', '.join(f'{n}/{k}' for n, k in combos)} x {args.seeds} seed(s), {args.steps} steps each",
          flush=True)
    parts = []
    with tempfile.TemporaryDirectory(prefix="modeguard-callgrind-") as tmp, \
            concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        jobs = [pool.submit(measure, n, k, s, args.steps, tmp) for n, k in combos for s in seeds]
        for fut in concurrent.futures.as_completed(jobs):
            part = fut.result()
            parts.append(part)
            print(f"  {part['workload']} / {part['key']} / seed {part['seed']}: done", flush=True)
    order = keys + [k for k in fw_keys if k not in keys]
    parts.sort(key=lambda q: (names.index(q["workload"]), order.index(q["key"]), q["seed"]))
    rows = summarise([q for q in parts if q["workload"] in plain])
    fw_rows = frameworks.summarise([q for q in parts if q["workload"] in framed])
    version = subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip()
    meta.update(valgrind=version, fixed_layout=fixed_layout(), total_seconds=round(time.perf_counter() - started, 1))
    result = {
        "meta": meta,
        "steps": args.steps, "seeds": seeds, "rows": rows, "targets": targets(rows),
        "framework_rows": fw_rows, "measurements": parts,
    }
    text = markdown(result)
    print()
    print(text)
    from .report import write_outputs

    write_outputs((args.json, json.dumps(result, indent=1) + "\n"), (args.markdown, text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
