"""Pulls through olah (a third-party, self-hosted Hub mirror) serving a local git repo offline."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CONFORMANCE

pytestmark = pytest.mark.hub
pytest.importorskip("olah")
VECTOR = CONFORMANCE / "valid" / "weight-kron-sharded"


def git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env
    ).stdout.strip()


def mirror_repo(root: Path) -> tuple[str, str]:
    """A git repo as olah mirrors it: safetensors as LFS pointers, objects in .git/lfs/objects."""
    repo = root / "models" / "me" / "curv"
    repo.mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    for source in VECTOR.iterdir():
        data = source.read_bytes()
        if source.suffix == ".safetensors":
            oid = hashlib.sha256(data).hexdigest()
            store = repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4]
            store.mkdir(parents=True, exist_ok=True)
            (store / oid).write_bytes(data)
            data = f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n".encode()
        (repo / source.name).write_bytes(data)
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "artifact")
    git(repo, "tag", "v1")
    return git(repo, "rev-parse", "HEAD"), "v1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def olah(tmp_path: Path):
    sha, tag = mirror_repo(tmp_path / "mirrors")
    port = free_port()
    config = tmp_path / "olah.toml"
    config.write_text(
        f'[basic]\nhost = "127.0.0.1"\nport = {port}\nmirror-netloc = "127.0.0.1:{port}"\n'
        f'mirror-lfs-netloc = "127.0.0.1:{port}"\nrepos-path = "{tmp_path / "repos"}"\n'
        f'mirrors-path = ["{tmp_path / "mirrors"}"]\n\n[accessibility]\noffline = true\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "olah.server", "-c", str(config)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"olah did not start: {proc.stderr.read()[-2000:]}")
            time.sleep(0.3)
    try:
        yield f"http://127.0.0.1:{port}", sha, tag
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_pull_through_olah_by_branch_tag_and_sha(olah, tmp_path: Path) -> None:
    url, sha, tag = olah
    for revision in ("main", tag, sha):
        home = tmp_path / f"home-{revision}"
        env = {**os.environ, "HF_ENDPOINT": url, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0"}
        result = subprocess.run(
            [sys.executable, "-m", "laplace_hub.cli", "pull", f"me/curv@{revision}", "--json"],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        info = json.loads(result.stdout)
        assert info["revision"] == sha
        pulled = Path(info["path"])
        for source in VECTOR.iterdir():
            assert (pulled / source.name).read_bytes() == source.read_bytes(), source.name
    shutil.rmtree(tmp_path / "repos", ignore_errors=True)
