"""MkDocs hooks of the documentation site (``hooks:`` in mkdocs.yml); nothing here is published.

* Pages from outside ``docs/``: ``spec/SPEC.md`` as the normative spec page, an index of
  ``spec/conformance/``, README's introduction on the home page, and the CLI reference, written
  from the argparse parsers at build time (what ``laplace-hub COMMAND --help`` prints).
* Links: the Markdown sources link the way GitHub reads them (``../spec/SPEC.md`` from
  ``docs/format.md``, ``docs/trust.md`` from README.md). A link that leaves ``docs/`` is rewritten
  to the site's copy of its target, and a file such a link names is added to the site; one that
  is in neither the repository nor the site stays as written, and ``mkdocs build --strict`` fails.
* Undocumented public names: every name in the ``__all__`` of a module of the API reference
  (``PUBLIC_MODULES``) needs a docstring and must be rendered on some page, else the build fails.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import posixpath
import re
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

ROOT = Path(__file__).resolve().parent.parent
DOCS = "docs/"
SPEC_PAGE = "spec/SPEC.md"
CONFORMANCE = "spec/conformance"
CLI_PAGE = "cli.md"
# the modules of the API reference (docs/api/); their public names must all have a docstring
PUBLIC_MODULES = (
    "laplace_hub",
    "laplace_hub.artifact",
    "laplace_hub.producers",
    "laplace_hub.consumers",
    "laplace_hub.hub",
    "laplace_hub.bridges",
    "laplace_hub.bridges.curvlinops",
    "laplace_hub.bridges.kronfluence",
    "laplace_hub.bridges.laplace_torch",
    "laplace_hub.validate",
    "laplace_hub.curvature",
    "laplace_hub.evaluation",
    "laplace_hub.manifest",
    "laplace_hub.errors",
)
README_INTRO = "<!-- README intro -->"
_rendered: set[str] = set()  # the ids of the objects mkdocstrings rendered in this build
# code (fenced or inline) is skipped; a link is `](target)` or `](target "title")` (the docs use
# no reference-style links and no HTML links)
_LINK = re.compile(
    r"(?P<fence>^[ \t]*(?P<ticks>```|~~~).*?^[ \t]*(?P=ticks))|(?P<code>`[^`\n]+`)"
    r"|\]\((?P<target>[^)\s]+)(?P<rest>\s+\"[^\"]*\")?\)",
    re.M | re.S,
)
_MISSING = object()
_EXTERNAL = re.compile(r"^([a-z][a-z0-9+.-]*:|#|/)", re.I)


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    """Fail before anything is rendered when a public name has no docstring."""
    missing = undocumented(PUBLIC_MODULES)
    if missing:
        raise PluginError("public names without a docstring: " + ", ".join(missing))
    return config


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add the pages from outside ``docs/`` and every repository file a page links to."""
    files.append(_file(SPEC_PAGE, config))
    files.append(File.generated(config, f"{CONFORMANCE}/index.md", content=conformance_page()))
    files.append(File.generated(config, CLI_PAGE, content=cli_page()))
    sources = [(page.content_string, _repo_path(page)) for page in files.documentation_pages()]
    sources.append((readme_intro(), "README.md"))  # on the home page
    for text, source in sources:
        for target in sorted(_linked_repo_files(text, source)):
            if files.get_file_from_path(_site_path(target)) is None:
                files.append(_file(target, config))
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    """Insert README's introduction on the home page; point links that leave ``docs/`` at the site."""
    source, site = _repo_path(page.file), page.file.src_uri
    if source == DOCS + "index.md":
        intro = rewrite_links(readme_intro(), "README.md", site)
        markdown = markdown.replace(README_INTRO, intro.strip())
    return rewrite_links(markdown, source, site)


def on_page_content(html: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    """Note which objects the API reference rendered (mkdocstrings gives each an id, its path)."""
    _rendered.update(re.findall(r'id="(laplace_hub[\w.]*)"', html))
    return html


def on_env(env: Any, config: MkDocsConfig, files: Files) -> Any:
    """Fail when a public name is on no page (the pages are rendered by now)."""
    rendered = {id(obj) for obj in map(_object_at, _rendered) if obj is not None}
    absent = [
        f"{path}.{name}"
        for path in PUBLIC_MODULES
        for name in public_names(importlib.import_module(path))
        if id(getattr(importlib.import_module(path), name)) not in rendered
    ]
    _rendered.clear()
    if absent:
        raise PluginError(
            "public names on no page of the API reference: " + ", ".join(absent) + " (a function named like its"
            " own module is invisible to mkdocstrings: add `::: package.module.function` to its docs/api/ page)"
        )
    return env


def readme_intro() -> str:
    """README.md up to its first section: the title, the pitch and what the package holds."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text.split("\n## ", 1)[0]


def rewrite_links(markdown: str, source: str, site: str) -> str:
    """Rewrite the relative links of ``source`` (a repository path) for the page at ``site``."""

    def replace(match: re.Match[str]) -> str:
        if match["target"] is None:
            return match[0]
        path, sep, anchor = match["target"].partition("#")
        target = _resolve(path, source)
        if target is None:
            return match[0]
        if (ROOT / target).is_dir():
            target = f"{target}/index.md"  # a folder's index page (spec/conformance/ has a generated one)
        link = posixpath.relpath(_site_path(target), posixpath.dirname(site) or ".")
        return f"]({link}{sep}{anchor}{match['rest'] or ''})"

    return _LINK.sub(replace, markdown)


def undocumented(modules: tuple[str, ...]) -> list[str]:
    """The public names of ``modules`` without a docstring, as ``module.name``.

    A class or function is looked up where it is defined (griffe, the docs' parser, cannot see a
    function that shadows its own submodule, ``laplace_hub.hub.push``); data by where it is exported.
    """
    import griffe

    package = griffe.load("laplace_hub", search_paths=[str(ROOT)], resolve_aliases=True, resolve_external=False)
    missing = []
    for path in modules:
        module = importlib.import_module(path)
        if not module.__doc__:
            missing.append(path)
        for name in public_names(module):
            obj = getattr(module, name)
            if inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj):
                where = obj.__name__ if inspect.ismodule(obj) else f"{obj.__module__}.{obj.__qualname__}"
                documented = bool(inspect.getdoc(obj)) if inspect.ismodule(obj) else _griffe_doc(package, where)
            else:
                documented = _griffe_doc(package, f"{path}.{name}")
            if not documented:
                missing.append(f"{path}.{name}")
    return missing


def public_names(module: ModuleType) -> list[str]:
    """A public module's ``__all__``; the build fails on a public module without one."""
    names = getattr(module, "__all__", None)
    if names is None:
        raise PluginError(f"{module.__name__} is in the API reference but has no __all__")
    return list(names)


def _griffe_doc(package: Any, path: str) -> bool:
    try:
        member = package[path.removeprefix("laplace_hub.")] if path != "laplace_hub" else package
    except KeyError:
        return False
    target = member.final_target if member.is_alias else member
    return bool(target.docstring and target.docstring.value.strip())


def cli_page() -> str:
    """The command-line reference: the ``--help`` of ``laplace-hub`` and of each of its commands."""
    from laplace_hub.cli import build_parser

    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "78"  # argparse wraps to the terminal: the page must not, and must fit the column
    try:
        parser = build_parser()
        lines = [
            "# Command-line reference",
            "",
            "Written from the argparse parsers of `laplace_hub.cli` when the site is built: each section is",
            "what `laplace-hub COMMAND --help` prints. Known errors exit 1 with one line on stderr",
            "(`LAPLACE_HUB_DEBUG=1` shows the traceback), usage errors exit 2.",
            "",
            *_help_section(parser, "laplace-hub"),
        ]
        for name, command in _commands(parser):
            lines += _help_section(command, f"laplace-hub {name}")
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    return "\n".join(lines) + "\n"


def conformance_page() -> str:
    """An index of ``spec/conformance/``: per spec version, the valid artifacts and the invalid ones."""
    lines = [
        "# Conformance vectors",
        "",
        "The folders of `spec/conformance/` (listed when the site is built; [SPEC.md](../SPEC.md) says",
        "what they mean). A conforming reader accepts every valid artifact; a conforming validator",
        "reports, for every invalid one, the finding code of its `NAME.expected.json`.",
    ]
    for version in sorted(p for p in (ROOT / CONFORMANCE).iterdir() if p.is_dir()):  # penalties-*.json beside
        lines += [
            "",
            f"## {version.name}",
            "",
            "| artifact | finding | what is wrong | made from |",
            "|---|---|---|---|",
        ]
        for vector in sorted((version / "valid").iterdir()):
            lines.append(f"| `valid/{vector.name}` | valid | | |")
        for path in sorted((version / "invalid").glob("*.expected.json")):
            expected = json.loads(path.read_text(encoding="utf-8"))
            name = path.name.removesuffix(".expected.json")
            what = str(expected["what"]).replace("|", "\\|")
            lines.append(f"| `invalid/{name}` | `{expected['code']}` | {what} | `{expected['from']}` |")
    return "\n".join(lines) + "\n"


def _commands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    """Every subcommand, nested ones too, as ``("name [sub]", parser)``."""
    commands = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, command in action.choices.items():
                commands.append((name, command))
                commands += [(f"{name} {sub}", nested) for sub, nested in _commands(command)]
    return commands


COLUMN = 76  # monospace characters the content column shows at 1280 px (checked with headless Chromium)


def _help_section(parser: argparse.ArgumentParser, title: str) -> list[str]:
    lines = [part for line in parser.format_help().rstrip().splitlines() for part in _fitted(line)]
    return ["", f"## `{title}`", "", "```text", *lines, "```"]


def _fitted(line: str) -> list[str]:
    """A help line cut to the column: an example command goes on after a backslash, prose wraps; both indented."""
    if len(line) <= COLUMN:
        return [line]
    indent = " " * (len(line) - len(line.lstrip()))
    command = line.lstrip().startswith(("laplace-hub", "torchrun", "--", "HF_HUB"))
    parts = textwrap.wrap(
        line.strip(),
        COLUMN - len(indent) - 6,
        initial_indent=indent,
        subsequent_indent=indent + "    ",
        break_on_hyphens=False,
        break_long_words=False,
    )
    return [p + " \\" for p in parts[:-1]] + parts[-1:] if command else parts


def _file(repo_path: str, config: MkDocsConfig) -> File:
    """A repository file outside ``docs/``, published at its repository path."""
    return File(repo_path, str(ROOT), config.site_dir, config.use_directory_urls)


def _repo_path(file: File) -> str:
    """Where a site file comes from, relative to the repository root."""
    if file.abs_src_path is None:  # generated: the CLI page at the top, the conformance index in spec/
        return file.src_uri if file.src_uri.startswith("spec/") else DOCS + file.src_uri
    return Path(file.abs_src_path).resolve().relative_to(ROOT).as_posix()


def _object_at(path: str) -> object | None:
    """The object at a dotted path, imported as Python would; ``None`` if there is none."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:end]))
        except ImportError:
            continue
        for part in parts[end:]:
            obj = getattr(obj, part, _MISSING)
        return None if obj is _MISSING else obj
    return None


def _site_path(repo_path: str) -> str:
    return repo_path.removeprefix(DOCS)


def _resolve(path: str, source: str) -> str | None:
    """The repository path a relative link of ``source`` points at; ``None`` for other links."""
    if not path or _EXTERNAL.match(path):
        return None
    target = posixpath.normpath(posixpath.join(posixpath.dirname(source), path))
    return None if target.startswith("..") else target


def _linked_repo_files(markdown: str, source: str) -> set[str]:
    """The repository files outside ``docs/`` that ``markdown`` (from ``source``) links to."""
    found = set()
    for match in _LINK.finditer(markdown):
        target = _resolve((match["target"] or "").partition("#")[0], source)
        if target and not target.startswith(DOCS) and (ROOT / target).is_file():
            found.add(target)
    return found
