"""Strings an artifact carries, shown safely: on a terminal, in Markdown, in a card's YAML front matter.

A manifest's free-form strings (a base model's repo id and revision, a dataset's source and
description, software keys and values, a license, a lineage source, module names, the fields of a
newer minor) may hold any Unicode text the models accept: control characters, bidi overrides,
line breaks, NUL, quotes, backslashes. Data keeps them exactly (JSON, YAML, records); people see
them through these helpers, which never raise, and never let a string break a line, start a
terminal escape or leave its Markdown span.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml


def shown(text: str) -> str:
    r"""One line of text safe on a terminal: ``text`` itself when every character is printable, else its repr.

    >>> shown("me/tiny"), shown("a\nb"), shown("")
    ('me/tiny', "'a\\nb'", "''")
    """
    return text if text and text.isprintable() else repr(text)


def markdown_code(text: str) -> str:
    """``text`` as a Markdown code span: shown (one line, no control character), fenced by enough backticks.

    >>> markdown_code("me/tiny"), markdown_code("a`b")
    ('`me/tiny`', '``a`b``')
    """
    body = shown(text)
    ticks = "`" * (1 + max((len(run) for run in re.findall(r"`+", body)), default=0))
    # a span that starts or ends with a backtick or a space needs one space of padding on each side
    pad = " " if body[:1] in ("`", " ") or body[-1:] in ("`", " ") else ""
    return f"{ticks}{pad}{body}{pad}{ticks}"


# what Markdown (and HTML inside it) reads as syntax within a line; each may be backslash-escaped
_MARKDOWN_SYNTAX = re.compile(r"([\\`*_{}\[\]<>()#+!|~&$])")


def markdown_text(text: str | None) -> str:
    r"""``text`` as literal Markdown within a line (a table cell too): shown, its syntax escaped; none: nothing.

    >>> markdown_text("example/model"), markdown_text("a|<b>"), markdown_text(None)
    ('example/model', 'a\\|\\<b\\>', '')
    """
    return _MARKDOWN_SYNTAX.sub(r"\\\1", shown(text)) if text else ""


class _FrontMatterDumper(yaml.SafeDumper):  # type: ignore[misc]  # PyYAML is untyped
    """A safe dumper whose strings load back exactly and stay on one line each.

    A string with a character that is not printable (a control character, a line break, a bidi
    override, NUL) is written double-quoted, and then every non-ASCII character of it escaped.
    """

    allow_unicode: bool  # set by the Emitter

    def write_double_quoted(self, text: str, split: bool = True) -> None:
        keep = self.allow_unicode
        self.allow_unicode = keep and text.isprintable()
        try:
            super().write_double_quoted(text, split)
        finally:
            self.allow_unicode = keep


def _represent_str(dumper: yaml.SafeDumper, text: str) -> Any:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=None if text.isprintable() else '"')


_FrontMatterDumper.add_representer(str, _represent_str)


def front_matter(data: Mapping[str, Any]) -> str:
    """YAML for a card's front matter (without the ``---`` lines) that ``yaml.safe_load`` reads back as ``data``.

    Safe (plain data only), one line per scalar (no folding, line breaks escaped), so no line of it
    can read as the ``---`` that ends the front matter.
    """
    dumped: str = yaml.dump(
        dict(data), Dumper=_FrontMatterDumper, sort_keys=False, allow_unicode=True, width=float("inf")
    )
    return dumped
