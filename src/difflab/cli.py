"""The ``difflab`` command line: ``difflab train | sample | demo | eval | ...``.

Argument parsing only. Each subcommand is a module of :mod:`difflab.commands` exposing
``register(subparsers)``, which adds its parser and sets ``func`` (called with the parsed
namespace); ``func`` calls the command's typed library function. Errors those functions raise
name their parameters (:class:`difflab.commands.common.ParameterError`); :func:`main` prints
them with this command line's flags instead (:func:`flag_names`), as
``difflab COMMAND: error: ...`` with exit code 2 and no traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from difflab.commands import distill as distill_command
from difflab.commands import eval as eval_command
from difflab.commands import (
    sample,
    train,
    train_classifier,
    train_controlnet,
    train_features,
    tune_grid,
)
from difflab.commands.common import HelpFormatter, render_error
from difflab.denoiser import split_batch

__all__ = ["build_parser", "main", "flag_names", "FLAGS"]

# the modules that define subcommands, in the order `difflab --help` lists them
COMMAND_MODULES = (train, sample, tune_grid, train_classifier, eval_command, train_features,
                   train_controlnet, distill_command)

# Library parameter names whose flag is not ``--`` + the name with dashes (that is derived from
# the parsers, as are ``X=False`` -> ``--no-X``), by command ("*": every command).
FLAGS: dict[str, dict[str, str]] = {
    "*": {"ema=False": "--no-ema"},
    "eval": {"count": "--num", "samplers": "--sampler"},
}


class Parser(argparse.ArgumentParser):
    """Usage errors as one line, ``difflab COMMAND: error: ...`` (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="difflab",
        description="Train, sample, guide and evaluate denoising diffusion models.",
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def flag_names(parser: argparse.ArgumentParser, command: str | None) -> dict[str, str]:
    """Library parameter name -> flag for ``command``'s options: each option's ``dest`` ->
    its long flag (``cfg_rescale`` -> ``--cfg-rescale``, ``overrides`` -> ``--set``), a
    ``--no-X`` switch also as ``X=False``, then :data:`FLAGS`."""
    names: dict[str, str] = {}
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    cmd_parser = sub.choices.get(command) if sub is not None and command else None
    for action in getattr(cmd_parser, "_actions", []):
        longs = [s for s in action.option_strings if s.startswith("--")]
        if not longs or action.dest == "help":
            continue
        names[action.dest] = longs[0]
        if action.dest.startswith("no_") and isinstance(action, argparse._StoreTrueAction):
            names[f"{action.dest[3:]}=False"] = longs[0]
    names.update(FLAGS["*"])
    names.update(FLAGS.get(command or "", {}))
    return names


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with split_batch():  # inference calls run on every thread the command was given
            return int(args.func(args) or 0)
    except (ValueError, OSError, FloatingPointError) as e:
        # bad input, a full disk, a diverged run: one clear line, no traceback
        message = " ".join(render_error(e, flag_names(parser, args.command)).split())
        print(f"difflab {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
