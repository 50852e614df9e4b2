"""Helpers shared by the command modules."""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from laplace_hub.artifact.files import DEFAULT_MAX_BYTES
from laplace_hub.errors import LaplaceHubError

T = TypeVar("T")
# how the library spells a parameter in a message: `name`
_PARAMETER = re.compile(r"`(\w+)`")


def add_command(sub: Any, name: str, summary: str, examples: str) -> argparse.ArgumentParser:
    """Register a subcommand whose ``--help`` ends with usage examples."""
    parser = sub.add_parser(
        name,
        help=summary,
        description=textwrap.fill(summary, 76),  # kept as written (the examples below must be): wrap it here
        epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_quiet(parser, default=argparse.SUPPRESS)  # also after the command's name; the global flag's value stands
    return parser


def counted(n: int, unit: str) -> str:
    """``1 batch``, ``2 batches``, ``3 tokens``."""
    plural = unit + ("es" if unit.endswith(("ch", "s", "x")) else "s")
    return f"{n} {unit if n == 1 else plural}"


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append ``(default: …)`` to the help of every option that has a default worth saying."""
    for action in parser._actions:
        if not action.option_strings or action.default in (None, False, "", argparse.SUPPRESS):
            continue
        if "%(default)" not in (action.help or "") and "default" not in (action.help or ""):
            action.help = f"{action.help} (default: %(default)s)" if action.help else "default: %(default)s"


def add_quiet(parser: argparse.ArgumentParser, default: Any) -> None:
    """``-q/--quiet``: no progress on stderr (results, warnings and errors still appear)."""
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default,
        help="no progress bars or progress lines on stderr (results, warnings and errors still appear)",
    )


def parse_list(text: str, kind: Callable[[str], T], flag: str) -> tuple[T, ...]:
    """``"1,2,3"`` → ``(1, 2, 3)`` with an error naming the flag."""
    try:
        return tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise LaplaceHubError(f"{flag}: cannot read {text!r} as a comma-separated list") from None


def error_line(error: LaplaceHubError, flags: Mapping[str, str]) -> str:
    """The line ``main`` prints for a library error, its parameters spelled as the command's flags.

    The library names the parameter an error is about first in ``location`` (``"decay"``,
    ``"source 'x=y.txt'"``) and other parameters as `name` in the message; it knows nothing of
    flags, and one parameter may be a different flag in different commands.

    >>> error_line(LaplaceHubError("needs `lowrank_rank` ≥ 1", location="structure"), {"lowrank_rank": "--rank"})
    'structure: needs --rank ≥ 1'
    """
    message = _PARAMETER.sub(lambda m: flags.get(m[1], m[0]), error.message)
    if not error.location:
        return message
    parameter, space, value = error.location.partition(" ")
    return f"{flags.get(parameter, parameter)}{space}{value}: {message}"


def print_json(data: Any) -> None:
    """Machine-readable output on stdout."""
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def byte_size(text: str) -> int:
    """``64G`` → bytes (binary units K, M, G, T; an optional trailing ``B`` or ``iB``), for ``--max-bytes``."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:i?B)?\s*", text, flags=re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; e.g. 500M, 64G, 2T")
    return int(float(match[1]) * _UNITS[match[2].upper()])


def add_max_bytes(parser: argparse.ArgumentParser) -> None:
    """The reader's byte budget as a flag (an artifact declaring more is refused before any hashing)."""
    parser.add_argument(
        "--max-bytes",
        type=byte_size,
        default=DEFAULT_MAX_BYTES,
        metavar="SIZE",
        help=f"refuse artifacts declaring more bytes than this (default {human_bytes(DEFAULT_MAX_BYTES)})",
    )


def human_bytes(n: int) -> str:
    """``1536`` → ``1.5 KiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
