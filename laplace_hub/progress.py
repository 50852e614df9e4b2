"""Progress that suits where it goes: a bar on a terminal, plain lines in a log, nothing when quiet.

A redirected or CI log gets one plain line on stderr every tenth of the way (and at least every
:data:`LINE_EVERY_S` seconds on slow loops), never a carriage return; a terminal (or a notebook)
gets tqdm's bar. ``laplace-hub --quiet`` (or ``LAPLACE_HUB_QUIET=1``) silences both, and the
plain lines of :func:`note`.

Example:
    >>> total = 0
    >>> with quiet():
    ...     for batch in progress(range(4), desc="batches", unit="batch"):
    ...         total += batch
    >>> total
    6

"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sized
from contextlib import contextmanager
from typing import Any, Generic, TextIO, TypeVar

T = TypeVar("T")
QUIET_ENV = "LAPLACE_HUB_QUIET"
LINE_EVERY_S = 10.0
LINES_PER_LOOP = 10  # a loop of known length: a line every tenth of the way
_QUIET = [False]


def set_quiet(enabled: bool) -> None:
    """Silence (or restore) every progress report of this process."""
    _QUIET[0] = enabled


def is_quiet() -> bool:
    """Whether progress is silenced, by :func:`set_quiet` or ``LAPLACE_HUB_QUIET=1``."""
    return _QUIET[0] or os.environ.get(QUIET_ENV, "").strip().lower() not in ("", "0", "false", "no")


@contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """:func:`set_quiet` for the duration of a block; the previous setting comes back after."""
    previous = _QUIET[0]
    _QUIET[0] = enabled
    try:
        yield
    finally:
        _QUIET[0] = previous


def on_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: stderr) is a terminal, where a redrawn bar belongs."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _in_notebook() -> bool:
    return "ipykernel" in sys.modules  # tqdm.auto draws a widget there


def bars_wanted() -> bool:
    """Whether redrawn bars are wanted now: not quiet, and stderr a terminal or a notebook."""
    return not is_quiet() and (on_terminal() or _in_notebook())


def note(line: str) -> None:
    """A progress line on stderr (stdout carries results and ``--json``), unless quiet."""
    if not is_quiet():
        print(line, file=sys.stderr, flush=True)


def duration(seconds: float) -> str:
    """``75.2`` → ``1 min 15 s``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


@contextmanager
def phase(desc: str) -> Iterator[None]:
    """A step a user waits on without a count: a line when it starts, and one with its time when it ends."""
    note(f"{desc} ...")
    start = time.monotonic()
    yield
    note(f"{desc}: {duration(time.monotonic() - start)}")


class Progress(Generic[T]):
    """An iterable that reports its progress; made by :func:`progress`."""

    def __init__(
        self, iterable: Iterable[T], desc: str, total: int | None, unit: str, leave: bool, disable: bool
    ) -> None:
        self._iterable = iterable
        self.desc = desc
        self.unit = unit
        if total is None and isinstance(iterable, Sized):
            total = len(iterable)
        self.total = total
        self._postfix: dict[str, Any] = {}
        self._silent = disable or is_quiet()
        self._bar: Any = None
        if not self._silent and bars_wanted():
            from tqdm.auto import tqdm

            self._bar = tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave)

    def set_postfix(self, **values: Any) -> None:
        """Figures shown after the count (on the bar, or at the end of each plain line)."""
        if self._bar is not None:
            self._bar.set_postfix(**values)
        self._postfix = values

    def __iter__(self) -> Iterator[T]:
        if self._bar is not None:
            yield from self._bar
            return
        if self._silent:
            yield from self._iterable
            return
        start = last = time.monotonic()
        count = step = 0
        for item in self._iterable:
            yield item
            count += 1
            now = time.monotonic()
            reached = None if not self.total else count * LINES_PER_LOOP // self.total
            if (reached is not None and reached > step) or now - last >= LINE_EVERY_S:
                step = reached if reached is not None else step
                last = now
                note(self._line(count, now - start))
        if not self.total:
            note(self._line(count, time.monotonic() - start) + ", done")

    def _line(self, count: int, elapsed: float) -> str:
        done = f"{count} {self.unit}"
        if self.total:
            done = f"{count}/{self.total} {self.unit} ({100 * count / self.total:.0f}%)"
        extra = "".join(f", {key}={value}" for key, value in self._postfix.items())
        return f"{self.desc}: {done}, {duration(elapsed)}{extra}"


def progress(
    iterable: Iterable[T],
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    leave: bool = True,
    disable: bool = False,
) -> Progress[T]:
    """Iterate ``iterable`` with a progress report that suits stderr.

    Args:
        iterable: What to iterate.
        desc: What is being counted, at the start of the bar or line.
        total: How many items (default: ``len(iterable)`` when it has one).
        unit: The item's name, e.g. ``batch``.
        leave: Keep the terminal bar when done (plain lines always stay).
        disable: Report nothing (e.g. on every rank but the first).

    Returns:
        An iterable over the same items, with ``set_postfix(**figures)``.

    """
    return Progress(iterable, desc, total, unit, leave, disable)


@contextmanager
def library_bars(enabled: bool) -> Iterator[None]:
    """Turn huggingface_hub's and transformers' own bars off (``enabled=False``) for a block.

    Both libraries draw tqdm bars (downloads, "Loading weights") that fill a redirected log with
    carriage returns. Their programmatic switches are used, not ``HF_HUB_DISABLE_PROGRESS_BARS``,
    which huggingface_hub reads once at import: the previous state comes back after the block.
    """
    if enabled:
        yield
        return
    hub_utils: Any = None
    with contextlib.suppress(ImportError):
        from huggingface_hub import utils as hub_utils
    hub_was_on = hub_utils is not None and not hub_utils.are_progress_bars_disabled()
    transformers_logging = sys.modules.get("transformers.utils.logging")
    # imported during the block, transformers starts with the hub's state: its own would have been the hub's
    transformers_was_on = hub_was_on if transformers_logging is None else transformers_logging.is_progress_bar_enabled()
    if hub_utils is not None:
        hub_utils.disable_progress_bars()
    if transformers_logging is not None:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hub_utils is not None and hub_was_on:
            hub_utils.enable_progress_bars()
        transformers_logging = sys.modules.get("transformers.utils.logging")
        if transformers_logging is not None and transformers_was_on:
            transformers_logging.enable_progress_bar()


@contextmanager
def routed_tqdm(module_name: str) -> Iterator[None]:
    """Within a block, a module that calls ``tqdm(iterable, desc=...)`` directly gets :func:`progress`.

    For bars no library switch reaches: transformers' GGUF conversion calls ``tqdm.auto`` itself.
    A module that is not imported, or has no ``tqdm``, is left alone.
    """
    module: Any = sys.modules.get(module_name)
    original = getattr(module, "tqdm", None)
    if module is None or original is None:
        yield
        return

    def routed(iterable: Iterable[Any], *args: Any, desc: str = "", **kwargs: Any) -> Progress[Any]:
        if args or not {"total", "unit", "leave", "disable"}.issuperset(kwargs):
            return original(iterable, *args, desc=desc, **kwargs)
        return progress(iterable, desc=desc.rstrip(". ") or module_name, **kwargs)

    module.tqdm = routed
    try:
        yield
    finally:
        module.tqdm = original
