"""The Python examples of the README and the guides run as written."""

from __future__ import annotations

import re

import pytest

from tests.conftest import ROOT

PAGES = ["README.md", "docs/format.md", "docs/finetuner.md", "docs/publisher.md", "docs/trust.md", "docs/bridges.md"]


@pytest.mark.parametrize("page", PAGES)
def test_python_examples_run(page: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S)
    assert blocks
    namespace: dict[str, object] = {}  # a page's blocks run in order, as a reader would run them
    for block in blocks:
        exec(compile(block, page, "exec"), namespace)


def test_quoted_validator_output_is_what_it_prints(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every `$ laplace-hub validate X` in docs/format.md is followed by the first line it prints now."""
    from laplace_hub.cli import main

    monkeypatch.chdir(ROOT)
    text = (ROOT / "docs" / "format.md").read_text()
    quoted = re.findall(r"^\$ laplace-hub (validate \S+)\n(.+)$", text, re.M)
    assert quoted
    for command, line in quoted:
        main(command.split())
        assert capsys.readouterr().out.splitlines()[0] == line
