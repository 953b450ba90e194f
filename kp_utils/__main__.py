"""Command line: `python -m kp_utils run PARAMS.yaml` (or `kp run PARAMS.yaml`)."""

from __future__ import annotations

import argparse
import logging
import sys

from kp_utils.config import ConfigError, load_config
from kp_utils.logs import LOG_FORMAT
from kp_utils.runner import NOTEBOOKS, NotebookFailed, run_study


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser for the `run` and `check` commands."""
    parser = argparse.ArgumentParser(prog="kp", description="Knowledge-packing study runner.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the study's notebooks with Papermill")
    run.add_argument("params", help="study params file, e.g. params/cpu.yaml")
    run.add_argument(
        "--only",
        nargs="+",
        metavar="NOTEBOOK",
        help=f"run only these notebooks (names or prefixes of {list(NOTEBOOKS)})",
    )
    check = commands.add_parser("check", help="validate a params file without running anything")
    check.add_argument("params")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the command; return the process exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        if args.command == "check":
            config = load_config(args.params)
            print(f"{args.params}: valid study {config.study.name!r}, run folder {config.run_dir}")
            return 0
        run_study(args.params, args.only)
    except (ConfigError, FileNotFoundError, ValueError, NotebookFailed) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, (ConfigError, FileNotFoundError, ValueError)) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
