"""Timing, memory and the comparison itself.

Every (workload, phase) cell is timed in rounds: each round runs one block per
instrumentation, in an order rotated from round to round, so slow drift of the machine
(other processes, thermal state) spreads over all columns alike. A block installs the
instrumentation, warms up, and times with ``torch.utils.benchmark.Timer.blocked_autorange``
(which synchronizes the accelerator around each measurement); the per-iteration times of
all blocks of a column are pooled for the column's median and interquartile range; the
ratio and added time compare each block with the baseline block of the same round and
take the median over rounds. Installing and removing an instrumentation is never timed.
"""

from __future__ import annotations

import gc
import statistics
import threading
import time
import warnings
from typing import Dict, List, Optional

import torch
from torch.utils.benchmark import Timer

from .instruments import Instrument


def _quantiles(xs: List[float]):
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def time_block(op, threads: int, min_run_time: float, timer: str = "wall") -> List[float]:
    """Per-iteration seconds of each measurement block of ``op``. ``timer="cpu"`` counts
    the process's CPU time (CPU set only: with one torch thread the whole step, autograd
    included, runs on this thread), so time other processes take from a shared machine
    does not land in one column by chance."""
    kwargs = {"timer": time.process_time} if timer == "cpu" else {}
    m = Timer(stmt="op()", globals={"op": op}, num_threads=threads, **kwargs).blocked_autorange(min_run_time=min_run_time)
    return list(m.times)


def compare(workload, instruments: List[Instrument], phases=("train", "eval"), rounds: int = 5,
            block_time: float = 0.5, warmup: int = 3, threads: int = 1, timer: str = "wall", log=print) -> Dict[str, dict]:
    """Interleaved timing of ``workload`` under each instrumentation."""
    # samples[phase][key][round] = per-iteration times of that round's block
    samples = {ph: {inst.key: [] for inst in instruments} for ph in phases}
    for r in range(rounds):
        k = r % len(instruments)
        order = instruments[k:] + instruments[:k]
        for phase in phases:
            op = workload.operation(phase)
            for inst in order:
                inst.install(workload)
                try:
                    workload.set_phase(phase)
                    for _ in range(warmup):
                        op()
                    samples[phase][inst.key].append(time_block(op, threads, block_time, timer))
                finally:
                    inst.uninstall(workload)
        log(f"    round {r + 1}/{rounds} done")
    out = {}
    for phase in phases:
        base_blocks = [statistics.median(b) for b in samples[phase]["baseline"]]
        cols = {}
        for inst in instruments:
            blocks = samples[phase][inst.key]
            q1, med, q3 = _quantiles([t for b in blocks for t in b])
            # Paired within each round (blocks minutes apart would carry the machine's
            # drift into the comparison): median over rounds of this block vs baseline's.
            meds = [statistics.median(b) for b in blocks]
            ratios = [m / b for m, b in zip(meds, base_blocks)]
            diffs = [m - b for m, b in zip(meds, base_blocks)]
            cols[inst.key] = {
                "median_us": med * 1e6,
                "iqr_us": (q3 - q1) * 1e6,
                "n_samples": sum(len(b) for b in blocks),
                "ratio": statistics.median(ratios),
                "overhead_us": statistics.median(diffs) * 1e6,
                "round_ratios": [round(x, 4) for x in ratios],
            }
        out[phase] = cols
    return out


# ---- memory ----------------------------------------------------------------------------

class _RSSSampler:
    """Peak resident set size over a stretch of code, sampled every ``interval`` s from a
    thread (torch releases the GIL in its kernels, so the sampler sees the peaks)."""

    def __init__(self, interval: float = 0.0005):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            rss = self.proc.memory_info().rss
            if rss > self.peak:
                self.peak = rss
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False


def peak_memory(workload, instruments: List[Instrument], steps: int = 10) -> Dict[str, dict]:
    """Peak memory of ``steps`` training steps under each instrumentation: CUDA
    ``max_memory_allocated`` on a GPU, sampled RSS on the CPU. Not timed."""
    cuda = workload.device.startswith("cuda")
    out = {}
    for inst in instruments:
        inst.install(workload)
        try:
            workload.set_phase("train")
            workload.train_step()  # first-step allocations (optimizer state) out of the way
            gc.collect()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                for _ in range(steps):
                    workload.train_step()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated()
            else:
                with _RSSSampler() as s:
                    for _ in range(steps):
                        workload.train_step()
                peak = s.peak
        finally:
            inst.uninstall(workload)
        out[inst.key] = {"peak_mib": peak / 2 ** 20, "kind": "cuda_max_memory_allocated" if cuda else "rss"}
    base = out["baseline"]["peak_mib"]
    for v in out.values():
        v["ratio"] = v["peak_mib"] / base
    return out


def count_syncs(workload, instruments: List[Instrument], steps: int = 5) -> Optional[Dict[str, float]]:
    """Synchronizing CUDA calls per training step under each instrumentation, counted with
    ``torch.cuda.set_sync_debug_mode("warn")``. None off CUDA."""
    if not workload.device.startswith("cuda"):
        return None
    out = {}
    for inst in instruments:
        inst.install(workload)
        try:
            workload.set_phase("train")
            workload.train_step()
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    for _ in range(steps):
                        workload.train_step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            n = sum(1 for w in caught if "synchroniz" in str(w.message).lower())
        finally:
            inst.uninstall(workload)
        out[inst.key] = n / steps
    return out


def python_calls(workload, instruments: List[Instrument], steps: int = 3) -> Dict[str, float]:
    """Python and C function calls per training step under each instrumentation, counted
    with ``sys.setprofile``: a deterministic measure of added work, free of timing noise."""
    import sys

    out = {}
    for inst in instruments:
        inst.install(workload)
        try:
            workload.set_phase("train")
            for _ in range(3):
                workload.train_step()
            n = [0]

            def count(frame, event, arg):
                if event == "call" or event == "c_call":
                    n[0] += 1

            sys.setprofile(count)
            try:
                for _ in range(steps):
                    workload.train_step()
            finally:
                sys.setprofile(None)
        finally:
            inst.uninstall(workload)
        out[inst.key] = n[0] / steps
    return out


# ---- scaling ---------------------------------------------------------------------------

def scaling(make_workload, depths, instruments: List[Instrument], rounds: int = 4,
            block_time: float = 0.3, threads: int = 1, timer: str = "wall", log=print) -> List[dict]:
    """Added time (and added function calls) per training step against the number of
    modules."""
    rows = []
    for d in depths:
        w = make_workload(d)
        res = compare(w, instruments, phases=("train",), rounds=rounds, block_time=block_time,
                      warmup=2, threads=threads, timer=timer, log=lambda *_: None)["train"]
        calls = python_calls(w, instruments)
        for k, v in res.items():
            v["calls_per_step"] = calls[k]
            v["added_calls"] = calls[k] - calls["baseline"]
        rows.append({"blocks": d, "n_modules": w.n_modules, "columns": res})
        log(f"    {d} blocks ({w.n_modules} modules): " + ", ".join(
            f"{k} {v['overhead_us']:+.0f} us" for k, v in res.items() if k != "baseline"))
    return rows
