"""What every command shares: errors that name parameters, thread settings, the help format.

Errors. A command function raises :class:`ParameterError` (a ``ValueError``) or
:class:`MissingFileError` (a ``FileNotFoundError``) whose message marks the parameters it
names with :func:`param`::

    raise ParameterError(f"{param('cfg')} must be >= 0, got {w}")

``str(e)`` names them as the library does ("cfg must be >= 0, got -1"); a front end shows its
own names with ``e.render({"cfg": "--cfg"})`` ("--cfg must be >= 0, got -1"), which is what
``difflab`` prints (:func:`difflab.cli.main`); ``e.params`` lists the names.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping

__all__ = ["HelpFormatter", "ParameterError", "MissingFileError", "param", "render_error",
           "set_threads"]

_MARK = "\x00"  # never in a path, a number or a config value
_PARAM = re.compile(f"{_MARK}([A-Za-z_][A-Za-z0-9_]*(?:=[A-Za-z0-9_.+-]+)?){_MARK}")


def param(name: str) -> str:
    """``name`` marked as a parameter inside a :class:`ParameterError` message; ``name`` may
    carry a value, ``param("ema=False")``, for a front end that has a flag for it
    (``--no-ema``)."""
    return f"{_MARK}{name}{_MARK}"


class _NamesParameters:
    """Mixin: the message is a template whose marked parameters a front end renames."""

    template: str

    def _setup(self, template: str) -> str:
        self.template = template
        return self.render()

    @property
    def params(self) -> list[str]:
        """The parameters the message names, in order of appearance."""
        return list(dict.fromkeys(_PARAM.findall(self.template)))

    def render(self, names: Mapping[str, str] | None = None) -> str:
        """The message with each marked parameter replaced by ``names[param]`` (its own name
        where ``names`` has none)."""
        names = names or {}
        return _PARAM.sub(lambda m: names.get(m[1], m[1]), self.template)


class ParameterError(_NamesParameters, ValueError):
    """A bad argument value; the message names the parameter (see :func:`param`)."""

    def __init__(self, template: str):
        super().__init__(self._setup(template))


class MissingFileError(_NamesParameters, FileNotFoundError):
    """A path argument that does not exist; the message names the parameter."""

    def __init__(self, template: str):
        super().__init__(self._setup(template))


def render_error(error: BaseException, names: Mapping[str, str]) -> str:
    """The message of ``error`` with the parameters it names shown as ``names`` says (errors
    that mark no parameters are shown as they are)."""
    if isinstance(error, _NamesParameters):
        return error.render(names)
    return str(error)


def set_threads(threads: int | None) -> None:
    """Use ``threads`` torch CPU threads (None or 0: leave torch's choice). Threads belong to
    the caller, never to a library function."""
    if threads:
        import torch

        if int(threads) < 1:
            raise ParameterError(f"{param('threads')} must be >= 1, got {threads}")
        torch.set_num_threads(int(threads))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default once: not again where the help text already states it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text.lower():
            return text
        return super()._get_help_string(action)
