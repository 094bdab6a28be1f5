"""Command line: ``modeguard rules``, ``modeguard explain CODE``, ``modeguard demo`` and
``modeguard run SCRIPT.py``. Each command is a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .rules import RULES, get_rule


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
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
