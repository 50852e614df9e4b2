"""Nothing a user made is lost: kills at every step, concurrent pushes, pulls overlapping pushes, a user's folder.

Every test here uses real processes: the writers run in a separate Python process (forked once per
kill by ``kill_steps.py``), the racing pushes are two processes, and the locks are the kernel's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from laplace_hub.artifact import Artifact
from laplace_hub.cli import main
from laplace_hub.errors import HubError
from laplace_hub.hub import pull, push
from tests.conftest import CONFORMANCE, ROOT

OLD = CONFORMANCE / "valid" / "weight-kron"
NEW = CONFORMANCE / "valid" / "weight-diag"
HANG_GUARD_S = 300  # each run takes a few seconds


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=HANG_GUARD_S,
    )


def _kill_every_step(tmp_path: Path, op: str, *flags: str) -> list[dict]:
    shutil.copytree(OLD, tmp_path / "old")
    shutil.copytree(NEW, tmp_path / "new")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "tests.integration.kill_steps", op, str(tmp_path), *flags],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=HANG_GUARD_S,
        check=True,
    )
    return json.loads(done.stdout)


@pytest.mark.parametrize("op", ["save", "push", "pull"])
def test_a_kill_at_any_step_leaves_the_old_or_the_new_artifact(tmp_path: Path, op: str) -> None:
    """Artifact.save (so compute, merge, compress), a local-hub push and a pull into local_dir."""
    report = _kill_every_step(tmp_path, op)
    kills = [r for r in report if r["killed"]]
    assert len(kills) >= 5 and not report[-1]["killed"] and report[-1]["exit"] == 0, report
    assert {r["found"] for r in kills} == {"old", "new"}, report  # both sides of the swap were hit
    for r in report:
        assert r["found"] in ("old", "new") and r["found_after_sweep"] == r["found"], r
        assert r["after_rerun"] == "new" and r["left_after_rerun"] == [], r  # the next run cleans up
    assert any(r["staging_after_kill"] for r in kills)  # there was staging to clean


def test_without_an_atomic_exchange_the_next_writer_puts_the_old_folder_back(tmp_path: Path) -> None:
    """Two renames (no renameat2): a kill between them leaves the old folder aside, and the sweep restores it."""
    report = _kill_every_step(tmp_path, "save", "--two-renames")
    between = [r for r in report if r["found"] == "absent"]
    assert len(between) == 1 and any(".old-" in name for name in between[0]["staging_after_kill"]), report
    for r in report:
        assert r["found_after_sweep"] in ("old", "new") and r["after_rerun"] == "new" and not r["left_after_rerun"]


HOLD_STAGING = """
import sys, time
from pathlib import Path
from laplace_hub.artifact.staging import staging_folder
with staging_folder(Path(sys.argv[1]), "spill") as folder:
    print(folder.name, flush=True)
    while not Path(sys.argv[2]).exists():
        time.sleep(0.05)
"""


def _spawn(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", textwrap.dedent(code), *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def test_the_sweep_never_touches_a_live_writers_staging(tmp_path: Path) -> None:
    target, done = tmp_path / "out", tmp_path / "done"
    stale = tmp_path / ".out.tmp-0123456789ab"  # a killed writer's: no lock
    stale.mkdir()
    (stale / "laplace.safetensors").write_bytes(b"half")
    users = tmp_path / ".out.old-20240501"  # a user's own folder that merely looks like staging
    users.mkdir()
    process = _spawn(HOLD_STAGING, str(target), str(done))
    try:
        assert process.stdout is not None
        live = tmp_path / process.stdout.readline().strip()
        Artifact.open(NEW).save(target)
        assert not stale.exists() and live.is_dir() and users.is_dir()
    finally:
        done.touch()
        process.wait(timeout=HANG_GUARD_S)
    assert not live.exists()


RACE_PUSH = """
import importlib, sys, time
from pathlib import Path
from laplace_hub.cli import main
me, other, source, hub, meeting = sys.argv[1:6]
push_module = importlib.import_module("laplace_hub.hub.push")  # the package re-exports a function of that name
real_lock = push_module.folder_lock
def meet_then_lock(*args, **kwargs):  # both have read the parent and staged their copy
    Path(meeting, me).touch()
    while not Path(meeting, other).exists():
        time.sleep(0.02)
    return real_lock(*args, **kwargs)
push_module.folder_lock = meet_then_lock
sys.exit(main(["push", "me/curv", source, "--hub", hub]))
"""


def test_of_two_racing_pushes_one_wins_and_the_other_is_told(tmp_path: Path) -> None:
    """Both start from the same parent and meet at the commit; like create_commit(parent_commit=…)."""
    hub, meeting = tmp_path / "hub", tmp_path / "meeting"
    shutil.copytree(OLD, hub / "me" / "curv")
    meeting.mkdir()
    sources = {"a": NEW, "b": CONFORMANCE / "valid" / "weight-kron-eig"}
    runs = {
        me: _spawn(RACE_PUSH, me, other, str(sources[me]), str(hub), str(meeting))
        for me, other in (("a", "b"), ("b", "a"))
    }
    results = {me: (*p.communicate(timeout=HANG_GUARD_S), p.returncode) for me, p in runs.items()}
    assert sorted(code for _, _, code in results.values()) == [0, 1], results
    winner = next(me for me, (_, _, code) in results.items() if code == 0)
    loser_err = next(err for _, err, code in results.values() if code == 1)
    assert len(loser_err.strip().splitlines()) == 1 and "moved while pushing" in loser_err, loser_err
    assert (hub / "me" / "curv" / "laplace.json").read_bytes() == (sources[winner] / "laplace.json").read_bytes()
    assert sorted(p.name for p in (hub / "me").iterdir()) == [".curv.lock", "curv"]  # no staging left


def test_a_pull_keeps_reading_what_it_verified_while_a_push_replaces_the_folder(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    shutil.copytree(OLD, hub / "me" / "curv")
    pulled = pull("me/curv", hub=hub)  # in place: the hub's own folder, verified and mapped
    module = next(iter(pulled.manifest.modules))
    before = pulled.block(module, dtype=torch.float64).dense()
    pushed = _python(
        "import sys; from laplace_hub.cli import main; sys.exit(main(['push', 'me/curv', sys.argv[1], '--hub', "
        "sys.argv[2]]))",
        str(CONFORMANCE / "valid" / "weight-kron-sharded"),
        str(hub),
    )
    assert pushed.returncode == 0, pushed.stderr
    assert torch.equal(pulled.block(module, dtype=torch.float64).dense(), before)
    assert pull("me/curv", hub=hub).origin.revision != pulled.origin.revision


def test_pull_never_replaces_a_folder_it_did_not_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's case: a user's own artifact where the guide pulls to; then an edited earlier pull."""
    hub = tmp_path / "hub"
    shutil.copytree(NEW, hub / "example" / "model" / "laplace")
    mine = tmp_path / "mine"
    Artifact.open(OLD).save(mine)
    ours = (mine / "laplace.json").read_bytes()
    args = ["pull", "example/model", "--subfolder", "laplace", "--hub", str(hub), "--local-dir", str(mine)]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(mine) in err and "--overwrite" in err, err
    assert (mine / "laplace.json").read_bytes() == ours
    with pytest.raises(HubError, match="no pull wrote"):
        pull("example/model", subfolder="laplace", hub=hub, local_dir=mine)

    pulled = tmp_path / "pulled"
    pull("example/model", subfolder="laplace", hub=hub, local_dir=pulled)
    pull("example/model", subfolder="laplace", hub=hub, local_dir=pulled)  # its own earlier pull: fine
    (pulled / "laplace.json").write_bytes((pulled / "laplace.json").read_bytes() + b"\n")  # the user edits it
    with pytest.raises(HubError, match="changed since"):
        pull("example/model", subfolder="laplace", hub=hub, local_dir=pulled)
    assert main([*args[:-1], str(pulled), "--overwrite"]) == 0
    shard = next(p for p in pulled.iterdir() if p.suffix == ".safetensors")
    shard.write_bytes(shard.read_bytes())  # the user rewrites a tensor file (same bytes, a new mtime)
    os.utime(shard, ns=(0, 0))
    with pytest.raises(HubError, match="changed since"):
        pull("example/model", subfolder="laplace", hub=hub, local_dir=pulled)


def test_a_push_at_a_local_repos_root_never_replaces_the_repos_other_files(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    (hub / "me" / "m").mkdir(parents=True)
    (hub / "me" / "m" / "config.json").write_text("{}")
    with pytest.raises(HubError, match=r"holds other files \(config.json\).*--path-in-repo"):
        push(NEW, "me/m", hub=hub)
    assert (hub / "me" / "m" / "config.json").read_text() == "{}"
    push(NEW, "me/m", hub=hub, path_in_repo="laplace")  # beside the model's files: fine
    assert (hub / "me" / "m" / "config.json").exists()
