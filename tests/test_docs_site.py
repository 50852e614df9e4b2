"""The documentation site builds strictly, with every page it promises (scripts/test.sh builds it too)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import ROOT

pytest.importorskip("material", reason="the docs extra: pip install -e '.[docs]'")
pytest.importorskip("mkdocstrings_handlers.python", reason="the docs extra: pip install -e '.[docs]'")


def _hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "_hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    site = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return site, done


def test_strict_build(built: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    tmp_path, done = built
    assert done.returncode == 0, done.stdout + done.stderr
    spec = (tmp_path / "spec" / "SPEC" / "index.html").read_text(encoding="utf-8")
    assert "MUST" in spec and 'href="../manifest-1.3.schema.json"' in spec
    assert (tmp_path / "spec" / "manifest-1.3.schema.json").is_file()  # linked from the spec: published
    assert "value.not_psd" in (tmp_path / "spec" / "conformance" / "index.html").read_text(encoding="utf-8")
    cli = (tmp_path / "cli" / "index.html").read_text(encoding="utf-8")
    for command in ("compute", "validate", "inspect", "merge", "push", "pull", "sweep"):
        assert f"usage: laplace-hub {command}" in cli
    home = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "Curvature that travels with the weights" in home and 'href="trust/"' in home
    assert (tmp_path / "results" / "demo-pareto.png").is_file()
    api = "".join(path.read_text(encoding="utf-8") for path in (tmp_path / "api").rglob("*.html"))
    for name in ("laplace_hub.artifact.Artifact", "laplace_hub.consumers.LaplaceRegularizer", "laplace_hub.hub.push"):
        assert f'id="{name}' in api


def test_links_that_leave_docs_point_at_the_site() -> None:
    hooks = _hooks()
    page = "See [the spec](../spec/SPEC.md#1-purpose), [trust](trust.md) and `[code](../x.md)`."
    assert hooks.rewrite_links(page, "docs/format.md", "format.md") == (
        "See [the spec](spec/SPEC.md#1-purpose), [trust](trust.md) and `[code](../x.md)`."
    )
    readme = "[spec](spec/SPEC.md) · [why](docs/trust.md) · [vectors](spec/conformance/) · [web](https://x.org/a.md)"
    assert hooks.rewrite_links(readme, "README.md", "index.md") == (
        "[spec](spec/SPEC.md) · [why](trust.md) · [vectors](spec/conformance/index.md) · [web](https://x.org/a.md)"
    )
    assert hooks.rewrite_links("[vectors](conformance/)", "spec/SPEC.md", "spec/SPEC.md") == (
        "[vectors](conformance/index.md)"
    )


def test_public_names_without_a_docstring_are_found() -> None:
    hooks = _hooks()
    assert hooks.undocumented(hooks.PUBLIC_MODULES) == []
    assert set(hooks.PUBLIC_MODULES) >= {"laplace_hub", "laplace_hub.artifact", "laplace_hub.errors"}


def test_the_cli_reference_fits_the_content_column() -> None:
    """The content column shows COLUMN monospace characters at 1280 px (checked with headless Chromium);
    argparse output wider than that was cut off on the right."""
    hooks, inside, wide = _hooks(), False, []
    for line in hooks.cli_page().splitlines():
        inside ^= line.startswith("```")
        if inside and len(line) > hooks.COLUMN:
            wide.append(line)
    assert not wide, wide[:5]


@pytest.mark.slow
def test_nothing_in_the_content_column_scrolls_sideways_in_a_browser(
    built: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    """Every page at 1280 and 1024 px in headless Chromium (the Debian package; skipped without it)."""
    if shutil.which("chromium") is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    site, done = built
    assert done.returncode == 0
    for width in ("1280", "1024"):
        checked = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "check_site_layout.py"), str(site), "--width", width],
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert f"0 overflowing element(s) at {width} px" in checked.stderr
