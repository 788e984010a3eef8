"""The ``difflab`` command line: ``difflab train | sample | demo | eval | ...``.

Each subcommand lives with the room it belongs to and exposes ``register(subparsers)``,
which adds its parser and sets ``func`` (called with the parsed namespace). This module only
composes them.
"""

from __future__ import annotations

import argparse
import importlib
import sys


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default once: not again where the help text already states it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text.lower():
            return text
        return super()._get_help_string(action)


# modules that define subcommands; each has register(subparsers)
COMMAND_MODULES = (
    "difflab.train.commands",
    "difflab.train.grids",
    "difflab.train.classifier",
    "difflab.metrics.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="difflab",
        description="Train, sample, guide and evaluate denoising diffusion models.",
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:  # a room not built yet
            if e.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # bad input: a clear message, no traceback
        print(f"difflab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
