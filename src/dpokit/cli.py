"""The `dpo` command: parse, run, and turn user errors into one line and an exit status.

Exit status: 0 ok, 2 usage or input error, 1 training failure.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .config import add_arguments, from_namespace
from .errors import DPOError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpo", description="Align a causal LM to preference pairs with DPO and its family of losses.")
    parser.add_argument("--version", action="version", version=f"dpokit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = commands.add_parser("train", help="train a policy on preference pairs (default: the synthetic demo)",
                                description="Train a policy on preference pairs. Every flag can also be set in "
                                            "the --config YAML file; the command line wins.")
    add_arguments(train)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        raise SystemExit(2)
    try:
        if args.command == "train":
            from .loop import train

            train(from_namespace(args))
    except DPOError as err:
        print(f"dpo {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    except KeyboardInterrupt:
        print(f"dpo {args.command}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
