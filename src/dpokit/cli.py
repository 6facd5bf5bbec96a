"""The `dpo` command: parse, run, and turn user errors into one line and an exit status.

Exit status: 0 ok, 2 usage or input error, 1 training failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    _add_data_arguments(commands.add_parser("data", help="look at a data file before training on it"))
    report = commands.add_parser(
        "report", help="compare runs: curves on shared axes (PNG) and a summary table (markdown)",
        description="Plot the metrics.jsonl of one or several runs on shared axes (train solid, eval dashed) "
                    "and summarize them in a markdown table: final and best eval metrics, steps, pairs/s, wall time.")
    report.add_argument("runs", nargs="+", metavar="RUN", help="a `dpo train` output folder or its metrics.jsonl")
    report.add_argument("--out", default="report.png",
                        help="PNG to write; the table goes next to it as .md and to stdout (default: report.png)")
    return parser


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    from .config import FIELDS

    inspect = parser.add_subparsers(dest="data_command", metavar="inspect", required=True).add_parser(
        "inspect", help="pairs, format, token lengths, truncation, duplicates and examples with the boundary marked")
    inspect.add_argument("file", metavar="FILE", help="data file, folder, save_to_disk folder or hub dataset name")
    inspect.add_argument("--model", help="model or tokenizer folder: lengths in tokens and truncation counts")
    inspect.add_argument("--examples", type=int, default=2, help="examples to print (default: 2)")
    for name in ("data_split", "format", "columns", "pairs", "max_pairs", "skip_invalid", "max_length",
                 "max_prompt_length", "max_completion_length", "truncation_mode"):
        f = FIELDS[name]
        flag, text = f"--{name.replace('_', '-')}", f"{f.metadata['help']} (default: {f.default})"
        if f.default is False:
            inspect.add_argument(flag, action="store_true", help=text)
        else:
            inspect.add_argument(flag, type=int if "max" in name else str, default=f.default, help=text,
                                 choices=f.metadata.get("choices"))


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
        elif args.command == "report":
            from .report import write_report

            png = Path(args.out)
            print(write_report(args.runs, png, png.with_suffix(".md")), end="")
            print(f"wrote {png} and {png.with_suffix('.md')}", file=sys.stderr)
        elif args.command == "data":
            from .inspect_data import inspect
            from .models import load_tokenizer

            print("\n".join(inspect(
                args.file, tokenizer=load_tokenizer(args.model) if args.model else None, format=args.format,
                columns=args.columns, split=args.data_split, pairs=args.pairs, max_pairs=args.max_pairs,
                skip_invalid=args.skip_invalid, max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                max_completion_length=args.max_completion_length, truncation_mode=args.truncation_mode,
                examples=args.examples)))
    except DPOError as err:
        print(f"dpo {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    except KeyboardInterrupt:
        print(f"dpo {args.command}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
