"""Progress: a bar only on a terminal, plain lines (no carriage returns) in logs, nothing when quiet."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from laplace_hub.cli import main
from laplace_hub.progress import library_bars, progress, quiet, routed_tqdm
from tests.conftest import tiny_model_folder


def test_plain_lines_when_not_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    bar = progress(range(25), desc="batches", unit="batch")
    seen = []
    for i in bar:
        seen.append(i)
        bar.set_postfix(tokens=10 * (i + 1))
    err = capsys.readouterr().err
    assert seen == list(range(25))
    assert "\r" not in err
    lines = err.splitlines()
    assert 5 <= len(lines) <= 11  # about one a tenth of the way
    assert lines[-1].startswith("batches: 25/25 batch (100%)") and lines[-1].endswith("tokens=250")


def test_unknown_length_reports_the_end(capsys: pytest.CaptureFixture[str]) -> None:
    assert list(progress((i for i in range(3)), desc="gen")) == [0, 1, 2]
    assert capsys.readouterr().err.splitlines()[-1].startswith("gen: 3 it,")


def test_quiet_and_disabled_report_nothing(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    with quiet():
        assert list(progress(range(5), desc="x")) == list(range(5))
    assert list(progress(range(5), desc="x", disable=True)) == list(range(5))
    monkeypatch.setenv("LAPLACE_HUB_QUIET", "1")
    assert list(progress(range(5), desc="x")) == list(range(5))
    assert capsys.readouterr().err == ""


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_tqdm_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert list(progress(range(3), desc="bar")) == [0, 1, 2]
    assert "\r" in terminal.getvalue() and "bar" in terminal.getvalue()


def test_a_third_party_tqdm_is_routed_and_restored(capsys: pytest.CaptureFixture[str]) -> None:
    module = type(sys)("fake_library")
    module.tqdm = lambda iterable, **kw: pytest.fail("the original tqdm was called")  # type: ignore[attr-defined]
    original = module.tqdm  # type: ignore[attr-defined]
    sys.modules["fake_library"] = module
    try:
        with routed_tqdm("fake_library"):
            assert list(module.tqdm([1, 2], desc="Converting tensors...")) == [1, 2]  # type: ignore[attr-defined]
        assert module.tqdm is original  # type: ignore[attr-defined]
    finally:
        del sys.modules["fake_library"]
    assert capsys.readouterr().err.splitlines()[-1].startswith("Converting tensors: 2/2 it (100%)")


def test_library_bars_are_switched_off_and_back() -> None:
    from huggingface_hub import utils

    before = utils.are_progress_bars_disabled()
    with library_bars(False):
        assert utils.are_progress_bars_disabled()
    assert utils.are_progress_bars_disabled() == before


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama and a word-level tokenizer saved as a model folder, for the real ``compute``."""
    return tiny_model_folder(tmp_path_factory.mktemp("tiny-model"), [10] * 8)


@pytest.mark.parametrize("quiet_flag", [[], ["--quiet"]])
def test_compute_reports_plain_lines_when_redirected(
    model_folder: Path, quiet_flag: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["compute", str(model_folder), "--data", f"src={model_folder / 'source.txt'}", "--out", str(tmp_path / "a")]
    argv += ["--targets", "q_proj", "--max-length", "12", "--batch-size", "2", "--num-batches", "3", *quiet_flag]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "wrote" in out and "\r" not in err and "\r" not in out
    progress_lines = [line for line in err.splitlines() if line.startswith("curvature [src]: ")]
    if quiet_flag:
        assert progress_lines == [] and "pass" not in err  # nor the plan
    else:
        assert progress_lines[-1].startswith("curvature [src]: 3/3 batch (100%)")
