"""Tables and target checks from the numbers ``__main__`` collected."""

from __future__ import annotations

from typing import List

ORDER = ["baseline", "again", "watch", "auto", "naive", "torcheck"]
NAMES = {
    "baseline": "none",
    "again": "none again (A/A)",
    "watch": "modeguard.watch",
    "auto": "modeguard run",
    "naive": "naive hooks",
    "torcheck": "torcheck",
    "floor": "empty hooks",  # benchmarks.instructions only
}
#: Ratio targets for modeguard's step time over the baseline's (CPU; GPU under AMP).
CPU_RATIO = {"mlp": 1.05, "resnet18": 1.02, "transformer": 1.02}
GPU_RATIO = {"resnet50": 1.01, "transformer": 1.01}
NAIVE_FRACTION = 0.2
MODEGUARD = ("watch", "auto")


def _cols(columns: dict) -> List[str]:
    return [k for k in ORDER if k in columns]


def _us(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}"


def timing_table(rows: list) -> str:
    if not rows:
        return ""
    cols = _cols(rows[0]["timing"]["train"])
    head = "| workload | phase | baseline median (IQR) µs | " + " | ".join(
        f"{NAMES[c]}: ratio (added µs)" for c in cols if c != "baseline") + " |"
    lines = [head, "|" + "---|" * (2 + len(cols))]
    for r in rows:
        for phase in ("train", "eval"):
            t = r["timing"].get(phase)
            if not t:
                continue
            b = t["baseline"]
            cells = [f"{t[c]['ratio']:.3f} ({t[c]['overhead_us']:+,.0f})" if abs(t[c]['overhead_us']) >= 10
                     else f"{t[c]['ratio']:.3f} ({t[c]['overhead_us']:+.1f})" for c in cols if c != "baseline"]
            what = "train step" if phase == "train" else "eval forward"
            lines.append(f"| {r['label']} ({r['n_modules']} modules) | {what} | {_us(b['median_us'])} ({_us(b['iqr_us'])}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_table(rows: list) -> str:
    if not rows:
        return ""
    cols = _cols(rows[0]["memory"])
    kind = rows[0]["memory"]["baseline"]["kind"]
    unit = "peak RSS, MiB" if kind == "rss" else "max_memory_allocated, MiB"
    lines = [f"| workload ({unit}) | " + " | ".join(NAMES[c] for c in cols) + " |", "|" + "---|" * (1 + len(cols))]
    for r in rows:
        m = r["memory"]
        cells = [f"{m[c]['peak_mib']:.1f}" + ("" if c == "baseline" else f" ({m[c]['ratio']:.3f})") for c in cols]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    if any(r.get("syncs_per_step") for r in rows):
        lines += ["", "| workload (synchronizing CUDA calls per step) | " + " | ".join(NAMES[c] for c in cols) + " |",
                  "|" + "---|" * (1 + len(cols))]
        for r in rows:
            s = r["syncs_per_step"]
            lines.append(f"| {r['label']} | " + " | ".join(f"{s[c]:.1f}" for c in cols) + " |")
    return "\n".join(lines)


def scaling_table(rows: list) -> str:
    if not rows:
        return ""
    cols = [c for c in _cols(rows[0]["columns"]) if c != "baseline"]
    lines = [
        "| blocks | modules | baseline step µs | " + " | ".join(f"{NAMES[c]} added µs" for c in cols) + " | "
        + " | ".join(f"{NAMES[c]} added calls" for c in cols) + " |",
        "|" + "---|" * (3 + 2 * len(cols)),
    ]
    for r in rows:
        c = r["columns"]
        lines.append(
            f"| {r['blocks']} | {r['n_modules']} | {_us(c['baseline']['median_us'])} | "
            + " | ".join(f"{c[k]['overhead_us']:+,.0f}" for k in cols) + " | "
            + " | ".join(f"{c[k]['added_calls']:+,.0f}" for k in cols) + " |"
        )
    return "\n".join(lines)


def calls_table(rows: list) -> str:
    rows = [r for r in rows if r.get("calls_per_step")]
    if not rows:
        return ""
    keys = [k for k in ORDER if k in rows[0]["calls_per_step"] and k != "baseline"]
    lines = [
        "| workload | baseline calls per step | " + " | ".join(NAMES[k] for k in keys) + " |",
        "|---|---" + "|---" * len(keys) + "|",
    ]
    for r in rows:
        c = r["calls_per_step"]
        base = c["baseline"]
        lines.append(f"| {r['label']} | {base:,.0f} | " + " | ".join(f"+{c[k] - base:,.1f}" for k in keys) + " |")
    return "\n".join(lines)


def check_targets(result: dict) -> list:
    checks = []

    def add(name, value, limit, ok, note=""):
        checks.append({"target": name, "value": value, "limit": limit, "met": bool(ok), "note": note})

    for r in result.get("cpu", []):
        t = r["timing"]["train"]
        limit = CPU_RATIO.get(r["workload"])
        for k in MODEGUARD:
            if k in t and limit is not None:
                add(f"CPU {r['workload']} train-step ratio, {NAMES[k]}", round(t[k]["ratio"], 4), limit, t[k]["ratio"] <= limit)
    for section in ("cpu", "gpu"):
        rows = result.get(section)
        if not isinstance(rows, list):
            continue
        for r in rows:
            for phase, t in r["timing"].items():
                if "naive" not in t:
                    continue
                naive = t["naive"]["overhead_us"]
                noise = f"; A/A {t['again']['overhead_us']:+.1f} µs" if "again" in t else ""
                for k in MODEGUARD:
                    if k in t:
                        add(f"{section.upper()} {r['label']} {phase}: {NAMES[k]} added time <= 1/5 of naive",
                            round(t[k]["overhead_us"], 1), round(naive * NAIVE_FRACTION, 1),
                            t[k]["overhead_us"] <= naive * NAIVE_FRACTION, f"naive adds {naive:.1f} µs{noise}")
            c = r.get("calls_per_step")
            if c and "naive" in c:
                naive = c["naive"] - c["baseline"]
                for k in MODEGUARD:
                    if k in c:
                        added = c[k] - c["baseline"]
                        add(f"{section.upper()} {r['label']} train: {NAMES[k]} added calls <= 1/5 of naive",
                            round(added, 1), round(naive * NAIVE_FRACTION, 1), added <= naive * NAIVE_FRACTION,
                            f"naive adds {naive:.1f} calls per step (deterministic)")
    gpu = result.get("gpu")
    if isinstance(gpu, list):
        for r in gpu:
            limit = GPU_RATIO.get(r["workload"])
            if r["amp"] is None or limit is None:
                continue
            t = r["timing"]["train"]
            for k in MODEGUARD:
                add(f"GPU {r['label']} train-step ratio, {NAMES[k]}", round(t[k]["ratio"], 4), limit, t[k]["ratio"] <= limit)
                mem = r["memory"][k]["ratio"]
                add(f"GPU {r['label']} peak memory ratio, {NAMES[k]}", round(mem, 4), 1.01, mem <= 1.01)
                s = r["syncs_per_step"]
                if s is not None:  # counted on CUDA only
                    add(f"GPU {r['label']} extra syncs per step, {NAMES[k]}", s[k] - s["baseline"], 0, s[k] <= s["baseline"])
    sweep = result.get("scaling")
    if sweep:
        for k in MODEGUARD:
            if k not in sweep[0]["columns"]:
                continue
            calls = [row["columns"][k]["added_calls"] for row in sweep]
            add(f"scaling: {NAMES[k]} added calls per step, {sweep[0]['n_modules']} vs {sweep[-1]['n_modules']} modules",
                f"{calls[0]:.0f} -> {calls[-1]:.0f}", "flat", calls[-1] - calls[0] <= 2,
                "function calls per step added by the instrumentation (deterministic)")
    return checks


def markdown(result: dict) -> str:
    m = result["meta"]
    s = result["settings"]
    load = m.get("load_average_start"), m.get("load_average_end")
    out = [
        f"# modeguard overhead benchmarks",
        "",
        f"- date: {m['date']}; total run time {m.get('total_seconds', '?')} s",
        f"- machine: {m['cpu']} ({m['cpu_count']} cores), {m['platform']}; GPU: {m['cuda'] or 'none'}",
        f"- torch {m['torch']}, Python {m['python']}, modeguard {m['modeguard']} (commit {m.get('modeguard_commit')}), torcheck {m.get('torcheck') or 'not installed'}",
        f"- settings: torch.set_num_threads({s['threads']}); {s['rounds']} interleaved rounds per workload, "
        f"{s['block_time_s']} s per timed block (torch.utils.benchmark.Timer.blocked_autorange); "
        f"CPU timer: {'process CPU time' if s['timer'] == 'cpu' else 'wall clock'}",
        f"- load average (1, 5, 15 min) at start {load[0]}, at end {load[1]}"
        + (" (the machine was shared with other work)" if load[0] and load[0][0] > 0.5 else ""),
        "",
        "Ratio = median step time with the instrumentation / median without, compared within each "
        "interleaved round and then the median over rounds; added µs = the same for the difference "
        "(negative values are noise: the machine's jitter is larger than the cost).",
        "",
        "## CPU: time",
        "",
        timing_table(result.get("cpu", [])),
        "",
        "## CPU: memory (training steps)",
        "",
        memory_table(result.get("cpu", [])),
        "",
    ]
    calls = calls_table(result.get("cpu", []))
    if calls:
        out += [
            "## CPU: added function calls per training step (deterministic)",
            "",
            "Python and C function calls per training step added by each setup (counted with "
            "sys.setprofile, averaged over 32 steps): the work that the timing above measures "
            "through the machine's noise.",
            "",
            calls,
            "",
        ]
    if result.get("scaling"):
        out += [
            "## Scaling: added time per training step vs number of modules (modes unchanged)",
            "",
            "Linear(16, 16) + Dropout blocks, batch 4. Added calls = Python and C function calls per step "
            "added by the instrumentation (counted with sys.setprofile; deterministic).",
            "",
            scaling_table(result["scaling"]),
            "",
        ]
    gpu = result.get("gpu")
    out += ["## GPU and AMP", ""]
    if isinstance(gpu, list):
        out += [timing_table(gpu), "", memory_table(gpu), ""]
    else:
        out += [f"{gpu}. On a CUDA machine the same command times every model (plus a ResNet-50-sized CNN) "
                "in fp32, bf16 autocast and fp16 with GradScaler, and reports max_memory_allocated and "
                "synchronizing calls per step.", ""]
    out += ["## Targets", "", "| target | value | limit | met |", "|---|---|---|---|"]
    for c in result.get("targets", []):
        note = f" ({c['note']})" if c.get("note") else ""
        out.append(f"| {c['target']}{note} | {c['value']} | {c['limit']} | {'yes' if c['met'] else '**no**'} |")
    if result.get("skipped_instruments"):
        out += ["", "Skipped columns: " + "; ".join(f"{k}: {v}" for k, v in result["skipped_instruments"].items())]
    found = {r["label"]: {k: v for k, v in r["findings"].items() if v} for r in result.get("cpu", [])}
    found = {k: v for k, v in found.items() if v}
    out += ["", "Findings during the timed loops (all loops are correct, so any finding is a false positive): "
            + (str(found) if found else "none"), ""]
    return "\n".join(out)


def write_outputs(*outputs) -> None:
    """``(path, text)`` pairs: each text written to its path (folders made), where a path
    was given (``--json``, ``--markdown``)."""
    import os

    for path, content in outputs:
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(content)
