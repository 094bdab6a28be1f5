"""``python -m benchmarks [--quick] [--json PATH] [--markdown PATH] [--threads N]``

Runs the CPU set (and, where CUDA is available, the GPU/AMP set), prints the tables and
the targets, and optionally writes the numbers as JSON and the tables as markdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

import modeguard

from . import harness, report, workloads
from .instruments import Baseline, BaselineAgain, ModeguardAuto, ModeguardWatch, NaiveReference, all_instruments


def machine_info(threads: int) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "modeguard": modeguard.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import torcheck

        info["torcheck"] = torcheck.__version__
    except ImportError:
        info["torcheck"] = None
    info["modeguard_commit"] = _git_commit()
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def _git_commit():
    """HEAD of the checkout being measured, marked when modeguard/ has local changes."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "modeguard"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+local changes" if dirty else "")) or None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_set(title, wls, instruments, args, log) -> list:
    out = []
    all_instruments = instruments
    for w in wls:
        log(f"  {w.label}: {w.n_modules} modules, {w.n_params / 1e6:.2f} M parameters")
        t0 = time.perf_counter()
        keys = getattr(w, "instrument_keys", None)
        instruments = [i for i in all_instruments if keys is None or i.key in keys]
        timing = harness.compare(w, instruments, rounds=args.rounds, block_time=args.block_time,
                                 threads=args.threads, timer=args.timer if w.device == "cpu" else "wall", log=log)
        memory = harness.peak_memory(w, instruments, steps=3 if args.quick else 10)
        syncs = harness.count_syncs(w, instruments)
        # Deterministic companion to the timing: function calls each setup adds per
        # training step (averaged over enough steps to include sampled backward checks).
        calls = harness.python_calls(w, instruments, steps=4 if args.quick else 32)
        found = {inst.key: inst.violations() for inst in instruments}
        out.append({
            "workload": w.name, "amp": w.amp, "device": w.device, "label": w.label,
            "n_modules": w.n_modules, "n_params": w.n_params,
            "batch": list(w.inputs.shape), "timing": timing, "memory": memory,
            "syncs_per_step": syncs, "calls_per_step": calls, "findings": found, "seconds": round(time.perf_counter() - t0, 1),
        })
        log(f"    done in {out[-1]['seconds']} s")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: one tiny workload, few repeats")
    p.add_argument("--json", metavar="PATH", help="write the numbers, machine and versions as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the tables as markdown")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for the CPU set (default 1)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per workload")
    p.add_argument("--block-time", type=float, default=None, help="seconds per timed block")
    p.add_argument("--timer", choices=("cpu", "wall"), default="cpu",
                   help="CPU set: time the process's CPU time (default; other processes' load does not count) or wall-clock")
    p.add_argument("--no-gpu", action="store_true", help="skip the GPU/AMP set even if CUDA is available")
    p.add_argument("--no-scaling", action="store_true", help="skip the depth sweep")
    p.add_argument("--only", metavar="NAMES", default=None,
                   help="comma-separated workload names to run (e.g. mlp,transformer); default: all")
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 15
    if args.block_time is None:
        args.block_time = 0.05 if args.quick else 0.2
    torch.set_num_threads(args.threads)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    started = time.perf_counter()

    result = {"meta": machine_info(args.threads), "settings": {
        "quick": args.quick, "rounds": args.rounds, "block_time_s": args.block_time, "timer": args.timer,
        "threads": args.threads,
    }}
    instruments = all_instruments()
    skipped = {i.key: i.available() for i in instruments if i.available()}
    instruments = [i for i in instruments if i.key not in skipped]
    result["skipped_instruments"] = skipped
    result["columns"] = {i.key: i.title for i in instruments}

    log(f"CPU set ({args.threads} thread(s), {args.rounds} interleaved rounds)")
    only = set(args.only.split(",")) if args.only else None
    pick = lambda wls: [w for w in wls if only is None or w.name in only]  # noqa: E731
    result["cpu"] = run_set("CPU", pick(workloads.cpu_workloads(args.quick)), instruments, args, log)

    if not args.no_scaling:
        depths = [10, 30] if args.quick else [10, 30, 100, 300, 1000]
        log("Scaling sweep: Linear+Dropout blocks")
        sweep_inst = [Baseline(), BaselineAgain(), ModeguardWatch(), ModeguardAuto(), NaiveReference()]
        result["scaling"] = harness.scaling(
            workloads.scaling_workload, depths, sweep_inst, rounds=2 if args.quick else 3,
            block_time=0.05 if args.quick else 0.25, threads=args.threads, timer=args.timer, log=log,
        )

    if torch.cuda.is_available() and not args.no_gpu:
        log("GPU set (fp32, bf16 autocast, fp16 + GradScaler)")
        result["gpu"] = run_set("GPU", pick(workloads.gpu_workloads("cuda", args.quick)), instruments, args, log)
    else:
        why = "skipped: --no-gpu" if args.no_gpu else "skipped: CUDA is not available on this machine"
        result["gpu"] = why
        log(f"GPU set {why}")

    if hasattr(os, "getloadavg"):
        result["meta"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    result["meta"]["total_seconds"] = round(time.perf_counter() - started, 1)
    result["targets"] = report.check_targets(result)
    text = report.markdown(result)
    print()
    print(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
