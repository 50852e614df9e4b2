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
