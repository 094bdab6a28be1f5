"""Command line: ``modeguard rules``, ``modeguard explain CODE``, ``modeguard demo`` and
``modeguard run SCRIPT.py``. Each command is a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Tuple

from .rules import RULES, get_rule, rule_code

#: Exit status of ``modeguard run`` when a violation at or above ``--fail-on`` occurred.
EXIT_VIOLATIONS = 3
_FAIL_LEVELS = ("error", "warning", "info", "never")
#: How each setting's flag is named in messages (``_config.resolve`` labels).
_RUN_LABELS = {
    "on_violation": "argument --on-violation", "severities": "argument --rules",
    "backward_sample": "argument --backward-sample", "fail_on": "argument --fail-on",
}


def _cmd_rules(args) -> int:
    width = max(len(r.name) for r in RULES.values())
    for code, rule in RULES.items():
        print(f"{code}  {rule.name:<{width}}  {rule.severity.label:<7}  {rule.summary}")
    return 0


def _cmd_explain(args) -> int:
    try:
        rule = get_rule(args.code)
    except ValueError as exc:
        print(f"modeguard explain: {exc}", file=sys.stderr)
        return 2
    print(rule.explain())
    return 0


def _cmd_demo(args) -> int:
    from .demo import main as demo_main

    return demo_main()


# ---- modeguard run -------------------------------------------------------------------

# Options of `run` that take a value: splitting the command line must know them, because
# everything from SCRIPT (or `-m MODULE`) on belongs to the program.
_RUN_VALUE_OPTIONS = ("--fail-on", "--report-json", "--rules", "--on-violation", "--backward-sample")


def _split_run_argv(tokens: List[str]) -> Tuple[List[str], Optional[str], Optional[str], List[str]]:
    """``[OPTIONS] SCRIPT ARGS`` or ``[OPTIONS] -m MODULE ARGS`` -> (options, script,
    module, args). Options after SCRIPT are the program's, as with ``python``."""
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t == "--":
            rest = tokens[i + 1:]
            return tokens[:i], (rest[0] if rest else None), None, rest[1:]
        if t == "-m":
            rest = tokens[i + 1:]
            return tokens[:i], None, (rest[0] if rest else ""), rest[1:]
        if t.startswith("-m") and not t.startswith("--"):
            return tokens[:i], None, t[2:], tokens[i + 1:]
        if t.startswith("-") and t != "-":
            i += 2 if t in _RUN_VALUE_OPTIONS else 1
            continue
        return tokens[:i], t, None, tokens[i + 1:]
    return tokens, None, None, []


def _backward_sample(text: str) -> int:
    """--backward-sample: the same check as watch(backward_sample=...), argparse's error."""
    from ._config import backward_sample_from_text

    try:
        return backward_sample_from_text(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None


def _add_run_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "run",
        help="run a script (or -m module) under modeguard, as `python SCRIPT.py ARGS` would",
        usage="modeguard run [OPTIONS] SCRIPT.py [ARGS ...]\n       modeguard run [OPTIONS] -m MODULE [ARGS ...]",
        description=(
            "Run a Python program with every model it calls and every optimizer it steps watched, "
            "then print a summary of the train/eval mode problems found to stderr."
        ),
        epilog=(
            "Exit status: 3 if a violation at or above --fail-on occurred, otherwise the program's own; "
            "2 for bad usage. The MODEGUARD environment variable (off|warn|raise|record) "
            "sets the action when --on-violation is not given; MODEGUARD=off turns checking off."
        ),
        allow_abbrev=False,  # `--fail X` must not be read as --fail-on: X could be the script
    )
    p.add_argument("--fail-on", choices=_FAIL_LEVELS, default=None,
                   help="exit with status 3 when a violation at or above this severity occurred "
                        "(default: error; env MODEGUARD_FAIL_ON)")
    p.add_argument("--report-json", metavar="PATH", help="write the full report as JSON (schema: modeguard.report.schema)")
    p.add_argument("--rules", metavar="CODE=SEVERITY,...",
                   help="per-rule severity: off, info, warning or error, e.g. MG401=off,MG201=error "
                        "(env MODEGUARD_RULES)")
    p.add_argument("--on-violation", choices=("warn", "raise", "record"), default=None,
                   help="what happens when a rule fires while the program runs: record it for the summary "
                        "(default), also warn at the line, or raise in the program (env MODEGUARD)")
    p.add_argument("--backward-sample", type=_backward_sample, default=None, metavar="N",
                   help="follow about one ordinary training forward in N into autograd to confirm its backward "
                        "(default 16; 1 checks every step for a skipped backward, at some cost per step; "
                        "env MODEGUARD_BACKWARD_SAMPLE)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary table, not each problem's explanation")
    # Shown in --help only; _split_run_argv takes these apart before argparse sees them.
    p.add_argument("-m", dest="module", metavar="MODULE", help="run a library module as a script, like `python -m`")
    p.add_argument("script", nargs="?", metavar="SCRIPT.py", help="the program to run, followed by its own arguments")
    p.set_defaults(func=_cmd_run)
    return p


def _parse_run(parser: argparse.ArgumentParser, tokens: List[str]) -> argparse.Namespace:
    options, script, module, program_args = _split_run_argv(tokens)
    args = parser.parse_args(options)  # unknown options and bad choices: argparse's exit 2
    from ._config import ConfigError, resolve
    from ._runner import ProgramNotFound, check_target

    if module is None and script is None:
        parser.error("the following arguments are required: SCRIPT.py (or -m MODULE)")
    if module == "":
        parser.error("argument -m: expected one argument")
    try:
        # Flags > environment > defaults. Record by default, so that the summary at the
        # end is the one place to read.
        args.config = resolve(
            {"on_violation": args.on_violation, "severities": args.rules,
             "backward_sample": args.backward_sample, "fail_on": args.fail_on},
            defaults={"on_violation": "record"}, labels=_RUN_LABELS, rule_code=rule_code,
        )
    except ConfigError as exc:  # a bad flag or environment variable: one line, status 2
        parser.error(str(exc))
    args.fail_on = args.config.fail_on.value  # as the summary names it
    if args.report_json:
        from ._distributed import rank_info, report_path

        folder = os.path.dirname(os.path.abspath(report_path(args.report_json, rank_info())))
        if not os.path.isdir(folder):
            parser.error(f"argument --report-json: folder {folder!r} does not exist")
    try:
        check_target(module or script, as_module=module is not None)
    except ProgramNotFound as exc:
        hint = " (to launch workers, run `modeguard run -m torch.distributed.run ...`)" if script == "torchrun" else ""
        parser.error(f"{exc}{hint}")
    args.module, args.script, args.program_args = module, script, program_args
    args.run_options = options  # what a launcher's workers are given (_distributed)
    return args


def _cmd_run(args) -> int:
    from . import _auto as auto
    from . import _distributed as distributed
    from ._runner import run_program

    label = f"-m {args.module}" if args.module else args.script
    config = args.config
    if config.active and distributed.is_launcher(args.module, args.script):
        return _run_launcher(args)
    guard = auto.start(config=config)
    try:
        outcome = run_program(args.module or args.script, args.program_args, as_module=args.module is not None)
    finally:
        watched = auto.watched_names()
        auto.stop()
    report = guard.report()
    ranks = distributed.rank_info()
    # Violations at or above --fail-on decide the status even when the program failed
    # too (its traceback is already printed, and "exit_status" in the JSON keeps its own).
    worst = report.worst()
    status = EXIT_VIOLATIONS if worst is not None and config.fail_on.fails(worst) else outcome.exit_status
    failed_write = False
    if args.report_json:
        path = distributed.report_path(args.report_json, ranks)
        try:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(report.to_json(script=label, exit_status=outcome.exit_status,
                                        rank=ranks.rank, world_size=ranks.world_size) + "\n")
        except OSError as exc:
            print(f"modeguard run: cannot write the JSON report: {exc}", file=sys.stderr)
            failed_write = True
    # The summary comes last: under torchrun, the rank's last words before it exits.
    _print_summary(report, label, watched, config.active, outcome.exit_status, status, args, ranks)
    if ranks.several:
        set_by_us = status == EXIT_VIOLATIONS and status != outcome.exit_status
        if set_by_us:
            distributed.note_for_launcher(_status_line(outcome.exit_status, status, args.fail_on, report, ranks))
        distributed.end_of_rank(ranks, failing=set_by_us)
    return (status or 2) if failed_write else status


def _run_launcher(args) -> int:
    """``modeguard run -m torch.distributed.run ...``: the workers run under modeguard and
    print their own summaries; this process says what became of them."""
    from . import _distributed as distributed
    from ._runner import run_program

    launch = distributed.Launch()
    outcome = run_program(
        args.module or args.script, args.program_args, as_module=args.module is not None,
        main=lambda: distributed.launch_workers(args.program_args, args.run_options, launch),
    )
    head, status, tail = distributed.launch_summary(launch, outcome.exit_status, args.fail_on, EXIT_VIOLATIONS,
                                                    args.report_json)
    _write_at_once(sys.stderr, f"{head}\n{tail}\n")
    return status


def _print_summary(report, label, watched, checked, program_status, status, args, ranks) -> None:
    """The end-of-run summary on stderr: a rich table on a terminal, plain text otherwise.
    Written with one write() call, so that the summaries of ranks sharing a terminal or a
    log do not interleave line by line."""
    try:
        sys.stderr.flush()
        stream = sys.stderr
        me = f"modeguard ({ranks})" if ranks.several else "modeguard"
        if not checked:
            _write_at_once(stream, f"{me}: checking is off (MODEGUARD=off); nothing was checked.\n")
            return
        counts = report.counts()
        models = ", ".join(watched) if watched else "none (no model was called)"
        found = (
            f"{counts['error']} error, {counts['warning']} warning, {counts['info']} info"
            if report.violations else "no train/eval mode problems"
        )
        head = f"{me}: {found} in {label} (models watched: {models})"
        tail = _status_line(program_status, status, args.fail_on, report, ranks)
        if stream.isatty():
            from rich.console import Console

            from .report import Report

            console = Console(file=stream, highlight=False)
            with console.capture() as captured:
                if report.violations:
                    summary = Report(report.violations, title=head)
                    # The table, then (unless --quiet) each message, as str(report) has them.
                    console.print(summary.table(console.width) if args.quiet else summary)
                else:
                    console.print(head, markup=False, style="green")
                console.print(tail, markup=False, style="bold" if status != program_status else "")
            _write_at_once(stream, captured.get())
        else:
            _write_at_once(stream, _plain_summary(report, head, args.quiet) + tail + "\n")
    except Exception as exc:  # pragma: no cover - a broken stderr must not change the status
        try:
            print(f"modeguard: could not print the summary: {exc}", file=sys.__stderr__)
        except Exception:
            pass


def _write_at_once(stream, text: str) -> None:
    stream.write(text)
    stream.flush()


def _status_line(program_status: int, status: int, fail_on: str, report=None, ranks=None) -> str:
    if ranks is not None and ranks.several:
        # Under a launcher this is what explains a worker's failure: say who set it.
        me = f"modeguard ({ranks})"
        if status != program_status:
            from ._config import FailOn

            level = FailOn.parse(fail_on)
            found = ", ".join(sorted({f"{v.code} {v.name}" for v in report.violations if level.fails(v.severity)}))
            return (f"{me}: exit status {status}, set by modeguard, not by the program (which exited "
                    f"{program_status}): violations at or above --fail-on {fail_on} ({found}).")
        return f"{me}: exit status {status} (the program's own)."
    if status != program_status:
        return f"modeguard: exit status {status}: violations at or above --fail-on {fail_on} (the program exited {program_status})."
    return f"modeguard: exit status {status} (the program's own)."


def _plain_summary(report, head: str, quiet: bool) -> str:
    """The summary in a pipe: str(report) with ``head`` for its title, then a blank line
    before the status line when the messages are shown."""
    from .report.text import report_text

    text = report_text(report.violations, head, details=not quiet)
    return text + "\n" if report.violations and not quiet else text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modeguard", description="Catch PyTorch train/eval mode bugs while your program runs.")
    from ._version import __version__

    parser.add_argument("--version", action="version", version=f"modeguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("rules", help="list the rules")
    p.set_defaults(func=_cmd_rules)
    p = sub.add_parser("explain", help="explain one rule, e.g. `modeguard explain MG101`")
    p.add_argument("code", help="rule code or name (MG101, step-in-eval)")
    p.set_defaults(func=_cmd_explain)
    p = sub.add_parser("demo", help="run the bundled training loop that has the classic bug")
    p.set_defaults(func=_cmd_demo)
    parser._run_parser = _add_run_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "run":
        # The program's arguments may look like modeguard's own options: split first.
        args = _parse_run(parser._run_parser, argv[1:])
    else:
        args = parser.parse_args(argv)
    return _call(args)


def _call(args) -> int:
    """Run the command; a reader that went away (`modeguard explain MG101 | head`) ends it
    quietly, as Python's own tools do, with status 1 or the one already decided
    (`modeguard run`). argparse's own output (--help) already ignores a closed pipe."""
    status = None
    try:
        try:
            status = args.func(args)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not as noise at interpreter exit
    except BrokenPipeError:
        _stdout_to_devnull()
        return status or 1
    return status


def _stdout_to_devnull() -> None:
    """Point stdout at devnull, so that the flush at interpreter exit cannot fail again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (captured, replaced)
        sys.stdout = open(os.devnull, "w")
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


if __name__ == "__main__":
    raise SystemExit(main())
