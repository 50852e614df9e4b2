"""Every command: --help with examples, usage errors exit 2, known errors one line and exit 1."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from laplace_hub.cli import COMMANDS, build_parser, main
from tests.conftest import CONFORMANCE

NAMES = ["demo", "compute", "validate", "inspect", "compress", "merge", "push", "pull", "find", "sweep", "continual"]


def test_every_command_is_registered() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(NAMES)  # type: ignore[union-attr]
    assert len(COMMANDS) == 9


@pytest.mark.parametrize("name", NAMES)
def test_help_has_examples(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert "examples:" in capsys.readouterr().out


@pytest.mark.parametrize("name", NAMES)
def test_bad_flag_is_a_usage_error(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--no-such-flag"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["pull", "me/x", "--hub", "{tmp}/nothing"], "the local hub is not a readable folder"),
        (["push", "me/x", "{tmp}", "--hub", "{tmp}/hub"], "no manifest"),
        (["sweep", "smollm2", "--source", "x=y.txt", "--methods", "bogus", "--out", "{tmp}/s"], "Invalid method"),
        (
            ["compute", "smollm2", "--data", "x=stdlib:pydoc", "--out", "{tmp}/a", "--structure", "kron_tridiag"],
            "needs --parameterization lora",
        ),
        (["compute", "smollm2", "--data", "x={tmp}/none.txt", "--out", "{tmp}/a"], "no such file"),
        (["compute", "smollm2", "--data", "me=self:x", "--out", "{tmp}/a"], "self:N"),
        (["compute", "smollm2", "--data", "my data=stdlib:pydoc", "--out", "{tmp}/a"], "dataset name 'my data'"),
        (["compute", "smolm2", "--data", "x=stdlib:pydoc", "--out", "{tmp}/a"], "did you mean 'smollm2'?"),
        (["compute", "./no-such-model", "--data", "x=stdlib:pydoc", "--out", "{tmp}/a"], "no such model folder"),
        (["compute", "smollm2", "--data=-x=stdlib:pydoc", "--out", "{tmp}/a"], "dataset name '-x'"),
        (["compute", "smollm2", "--data", "x=stdlib:pydoc", "--out", "{tmp}"], "already exists"),
        (
            ["sweep", "smollm2", "--source", "x={tmp}/none.txt", "--target", "arithmetic", "--out", "{tmp}/s"],
            "no such file",
        ),
        (
            ["sweep", "smollm2", "--source", "x=stdlib:pydoc", "--task-sizes", "256,0", "--out", "{tmp}/s"],
            "--task-sizes '256,0': expected three positive counts",
        ),
        (
            [
                *("sweep", "smollm2", "--source", "x=stdlib:pydoc", "--target", "arithmetic"),
                *("--curvature", "own=self:x", "--out", "{tmp}/s"),
            ],
            "source 'own=self:x': expected self:N",
        ),
        (["merge", "{tmp}/a", "{tmp}/b", "--out", "{tmp}/c"], "no laplace-hub artifact"),
        (["continual", "--task1", "sorting", "--task2", "sorting"], "must differ"),
        (["continual", "--decay", "1.5"], "--decay must lie in (0, 1]"),
        (
            [
                "compute",
                "smollm2",
                "--data",
                "x=stdlib:pydoc",
                "--out",
                "{tmp}/a",
                "--structure",
                "diag_lowrank",
                "--rank",
                "0",
            ],
            "rank ≥ 1",
        ),
        (["find", "--base-model", "a/b", "--hub", "{tmp}"], None),
    ],
)
def test_known_errors_are_one_line(
    argv: list[str], message: str | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    if message is None:
        assert code == 0
        return
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1


def test_every_option_with_a_default_shows_it_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["compute", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("q_proj,k_proj,v_proj,o_proj)", "default: kron", "(default: 8)", "(default: 4)", "(default: 128)"):
        assert shown in text, shown


def test_a_misspelled_flag_gets_the_commands_usage_and_a_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["compute", "smollm2", "--data", "x=stdlib:pydoc", "--out", "x", "--strcture", "kron"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "laplace-hub compute: error" in err and "did you mean --structure?" in err


def test_pull_takes_revision_and_token_like_hf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hub = tmp_path / "hub"
    shutil.copytree(CONFORMANCE / "valid" / "weight-kron", hub / "me" / "curv")
    assert main(["pull", "me/curv", "--hub", str(hub), "--revision", "main", "--token", "hf_x", "--json"]) == 0
    assert main(["pull", "me/curv@v1", "--hub", str(hub), "--revision", "v2"]) == 1
    assert "two revisions" in capsys.readouterr().err


def test_push_takes_commit_message_and_keeps_message_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hub, folder = tmp_path / "hub", CONFORMANCE / "valid" / "weight-kron"
    assert main(["push", "me/curv", str(folder), "--hub", str(hub), "--create-repo", "--commit-message", "m"]) == 0
    assert "deprecated" not in capsys.readouterr().err
    assert main(["push", str(folder), "me/curv", "--hub", str(hub), "--message", "m"]) == 0  # the order before 0.2
    err = capsys.readouterr().err
    assert "--message is deprecated" in err and "`push FOLDER REPO` is deprecated" in err


def test_a_misspelled_command_gets_a_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["-q", "valdate", "./artifact"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "unknown command 'valdate' (did you mean validate?)" in err


def test_a_large_sweep_says_how_many_runs_it_plans() -> None:
    from laplace_hub.evaluation.sweep import SweepConfig, pending_runs, plan_line

    line = plan_line(SweepConfig())  # the defaults
    assert line is not None and f"sweep: {len(pending_runs(SweepConfig(), []))} fine-tuning runs of 40 steps" in line
    assert plan_line(SweepConfig(methods=("lora",), strengths=(1.0,), seeds=(0, 1))) is None
