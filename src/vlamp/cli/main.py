"""``vlamp`` entry point: sub-commands register themselves here; user errors exit 2 in one line."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from vlamp.cli import bench, data, demo, diagnose, doctor, evaluate, fit, merge, plan, train
from vlamp.precision.errors import VlampError

COMMANDS = (demo, doctor, plan, fit, data, train, evaluate, bench, diagnose, merge)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vlamp",
        description="Train vision-language-action policies in mixed precision: "
                    "choose precision -> train -> evaluate.",
    )
    from vlamp import __version__

    parser.add_argument("--version", action="version", version=f"vlamp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not getattr(args, "allow_extra", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.extra = extra  # `vlamp train --train.steps=10`: dotted config keys
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():  # every command says a warning in one line, the same way
            warnings.showwarning = _one_line_warning
            return int(args.run(args) or 0)
    except VlampError as e:
        print(f"vlamp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vlamp {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main_exit() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
