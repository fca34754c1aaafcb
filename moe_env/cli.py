"""`moe-env` entry point: dispatches to moe_env.commands.<name>, imported only when that command runs."""

from __future__ import annotations

import argparse
import importlib
import sys

from moe_env.error_boundary import run_reporting_errors

# name -> (module under moe_env.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("generate", "greedy decode with experts offloaded through the expert cache"),
    "record": ("record", "decode a prompt set and write an expert activation trace"),
    "convert": ("convert", "import an external routing log (JSONL) as a trace"),
    "trace-info": ("trace_info", "summarise a trace: shape and routing statistics"),
    "bench": ("bench", "replay traces through policies with the cost model and compare them"),
    "analyze": ("analyze", "write a report with figures about a trace"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="moe-env", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers = {name: sub.add_parser(name, help=help_text) for name, (_, help_text) in COMMANDS.items()}
    return parser, subparsers


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, subparsers = build_parser()
    name = argv[0] if argv and argv[0] in COMMANDS else None
    if name is None:
        parser.parse_args(argv)  # prints help / the unknown-command error and exits 2
        parser.print_help()
        return 2
    module = importlib.import_module(f"moe_env.commands.{COMMANDS[name][0]}")
    module.add_arguments(subparsers[name])
    args = parser.parse_args(argv)
    return run_reporting_errors(f"moe-env {name}", lambda: module.run(args))


if __name__ == "__main__":
    sys.exit(main())
