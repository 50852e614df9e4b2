"""A griffe extension for the API reference (mkdocs.yml): Sphinx roles in docstrings become links.

The docstrings cross-reference with roles (``:func:`expected_tensors```, ``:class:`~a.b.C```), which
mkdocstrings would print as they are. Each becomes the name in code font, linked to its entry when
the reference renders that object and plain code otherwise (an *optional* autoref: never a warning).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj|const):`(?P<tilde>~?)(?P<name>[\w.]+)`")


class RolesToLinks(griffe.Extension):
    """Rewrite the roles of every docstring in the package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Rewrite the docstrings of ``pkg`` and of everything in it."""
        _rewrite(pkg, seen=set())


def _rewrite(obj: griffe.Object, seen: set[str]) -> None:
    if obj.path in seen:
        return
    seen.add(obj.path)
    if obj.docstring is not None:
        obj.docstring.value = _ROLE.sub(lambda match: _link(obj, match), obj.docstring.value)
    for member in obj.members.values():
        if not member.is_alias:
            _rewrite(member, seen)  # type: ignore[arg-type]


def _link(obj: griffe.Object, match: re.Match[str]) -> str:
    name = match["name"]
    shown = name.rsplit(".", 1)[-1] if match["tilde"] else name
    head, _, rest = name.partition(".")
    try:
        identifier = name if head == "laplace_hub" else obj.resolve(head) + (f".{rest}" if rest else "")
    except griffe.NameResolutionError:
        identifier = name
    return f'<autoref identifier="{identifier}" optional><code>{shown}</code></autoref>'
