"""The ``laplace-hub`` command: thin wrappers over the library, one module per command.

Known errors become one line on stderr and exit 1, the library's parameters spelled as the
command's flags (a command lists them as its ``flags`` default); usage errors exit 2. Set
``LAPLACE_HUB_DEBUG=1`` to see tracebacks.

Progress goes to stderr: a bar on a terminal, plain lines (no carriage returns) when stderr is
redirected, nothing with ``--quiet`` (before or after the command's name).
"""

from __future__ import annotations

import argparse
import difflib
import io
import os
import sys
import time
from collections.abc import Sequence

from laplace_hub import __version__
from laplace_hub.cli import (
    compress_cmd,
    compute_cmd,
    continual_cmd,
    demo_cmd,
    hub_cmds,
    inspect_cmd,
    merge_cmd,
    sweep_cmd,
    validate_cmd,
)
from laplace_hub.cli._common import add_quiet, error_line, show_defaults
from laplace_hub.errors import LaplaceHubError
from laplace_hub.progress import bars_wanted, duration, library_bars, note, quiet

COMMANDS = (
    demo_cmd,
    compute_cmd,
    validate_cmd,
    inspect_cmd,
    compress_cmd,
    merge_cmd,
    hub_cmds,
    sweep_cmd,
    continual_cmd,
)


LONG_COMMANDS = frozenset({"compute", "compress", "merge", "pull", "push", "sweep", "continual", "demo"})


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="laplace-hub",
        description="Publish, validate and use Laplace curvature artifacts for LoRA fine-tuning.",
        epilog="Run `laplace-hub COMMAND --help` for examples.",
    )
    parser.add_argument("--version", action="version", version=f"laplace-hub {__version__}")
    add_quiet(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    for command_parser in sub.choices.values():
        show_defaults(command_parser)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse; an unknown command or flag is refused with a suggestion (a flag by the command's own parser)."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    if words and words[0] not in commands.choices:
        close = difflib.get_close_matches(words[0], list(commands.choices), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        parser.error(f"unknown command {words[0]!r}{hint}; run `laplace-hub --help` for the list")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = commands.choices[args.command]
        flags = [s for action in command._actions for s in action.option_strings]
        close = difflib.get_close_matches(unknown[0].split("=")[0], flags, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        command.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = _parse(build_parser(), argv)
    for stream in (sys.stdout, sys.stderr):  # names from hostile files must not end a report midway
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    start = time.monotonic()
    try:
        with quiet(args.quiet), library_bars(bars_wanted()):
            code = int(args.run(args))
            if args.command in LONG_COMMANDS:
                note(f"{args.command}: done in {duration(time.monotonic() - start)}")  # the whole wall time
            return code
    except LaplaceHubError as e:
        return _fail(f"error: {error_line(e, getattr(args, 'flags', {}))}", e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        return _fail(f"internal error: {type(e).__name__}: {e} (set LAPLACE_HUB_DEBUG=1 for a traceback)", e)


def _fail(line: str, error: BaseException) -> int:
    if os.environ.get("LAPLACE_HUB_DEBUG"):
        raise error
    print(" ".join(line.split()), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
