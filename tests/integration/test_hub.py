"""The hub layer against a real Hub-compatible server on 127.0.0.1, with the real huggingface_hub client.

Commands run in child processes whose HF_ENDPOINT points at the server before huggingface_hub is
imported; library calls name the endpoint explicitly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from laplace_hub.artifact import Artifact
from laplace_hub.errors import HubError
from laplace_hub.hub import pull, push
from tests.conftest import CONFORMANCE
from tests.hub_server import HubServer

pytestmark = pytest.mark.hub
TOKEN = "hf_secret_never_printed"
VECTOR = CONFORMANCE / "valid" / "weight-kron-sharded"
SHARDS = sorted(p.name for p in VECTOR.glob("laplace-*-of-*.safetensors"))


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub.constants

    # the test process is offline by default (conftest); library calls here talk to this server
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with HubServer() as hub:
        yield hub


def cli(server: HubServer, home: Path, *args: str, offline: bool = False) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HF_ENDPOINT": server.url,
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_XET": "1",
        "HF_TOKEN": TOKEN,
        "HF_HUB_OFFLINE": "1" if offline else "0",
    }
    result = subprocess.run(
        [sys.executable, "-m", "laplace_hub.cli", *args], capture_output=True, text=True, timeout=300, env=env
    )
    assert TOKEN not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.name.startswith("laplace"))
    return names == sorted(p.name for p in b.iterdir() if p.name.startswith("laplace")) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


def test_push_then_pull_by_branch_and_sha_bit_identical(server: HubServer, tmp_path: Path) -> None:
    pushed = cli(server, tmp_path / "p", "push", "me/curv", str(VECTOR), "--create-repo", "--json")
    assert pushed.returncode == 0, pushed.stderr
    sha = json.loads(pushed.stdout)["commit_sha"]
    assert len(server.state.repos["me/curv"].commits) == 2  # the initial commit and exactly one more
    for revision, home in (("", "c1"), (f"@{sha}", "c2")):
        pulled = cli(server, tmp_path / home, "pull", f"me/curv{revision}", "--json")
        assert pulled.returncode == 0, pulled.stderr
        info = json.loads(pulled.stdout)
        assert info["revision"] == sha
        assert same_files(VECTOR, Path(info["path"]))
        assert str(tmp_path / home) in info["path"]  # the standard cache of that HF_HOME
    offline = cli(server, tmp_path / "c1", "pull", "me/curv", "--json", offline=True)
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)["revision"] == sha
    cold = cli(server, tmp_path / "c3", "pull", "me/curv", offline=True)
    assert cold.returncode == 1 and "not in the cache" in cold.stderr
    card = server.state.blobs[server.state.repos["me/curv"].commits[sha].files["README.md"].sha256].decode()
    assert "library_name: laplace-hub" in card and "base_model: example/model" in card
    assert 'LaplaceRegularizer.from_pretrained("me/curv", model=peft_model' in card


def test_push_into_subfolder_of_a_model_repo_keeps_its_files(server: HubServer, tmp_path: Path) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=server.url, token=TOKEN)
    api.create_repo("example/model")
    api.create_commit(
        "example/model",
        [CommitOperationAdd("config.json", b"{}"), CommitOperationAdd("README.md", b"# the model\n")],
        commit_message="model",
    )
    before = dict(server.state.resolve(server.state.repos["example/model"], "main").files)
    result = cli(server, tmp_path, "push", "example/model", str(VECTOR), "--path-in-repo", "laplace")
    assert result.returncode == 0, result.stderr
    after = server.state.resolve(server.state.repos["example/model"], "main").files
    assert all(after[path] == entry for path, entry in before.items())
    assert {p for p in after if p.startswith("laplace/")} >= {"laplace/laplace.json", "laplace/README.md"}
    artifact = pull("example/model", subfolder="laplace", hub=server.url, cache_dir=tmp_path / "cache")
    assert artifact.origin.subfolder == "laplace"
    found = cli(server, tmp_path, "find", "--base-model", "example/model", "--json")
    assert [(f["repo_id"], f["subfolder"]) for f in json.loads(found.stdout)] == [("example/model", "laplace")]


def test_push_as_pull_request_leaves_main_alone(server: HubServer, tmp_path: Path) -> None:
    assert cli(server, tmp_path, "push", "me/curv", str(VECTOR), "--create-repo").returncode == 0
    main = server.state.repos["me/curv"].refs["main"]
    result = cli(
        server, tmp_path, "push", "me/curv", str(CONFORMANCE / "valid" / "weight-diag"), "--create-pr", "--json"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pr_url"].endswith("/discussions/1")
    assert server.state.repos["me/curv"].refs["main"] == main
    pr = pull("me/curv", revision="refs/pr/1", hub=server.url, cache_dir=tmp_path / "cache")
    assert {b.structure for m in pr.manifest.modules.values() for b in m.blocks} == {"diag"}


def test_invalid_artifact_is_refused_before_any_upload(server: HubServer, tmp_path: Path) -> None:
    result = cli(server, tmp_path, "push", "me/curv", str(CONFORMANCE / "invalid" / "nan"), "--create-repo")
    assert result.returncode == 1 and "value.non_finite" in result.stderr
    assert "me/curv" not in server.state.repos


def upload_raw(server: HubServer, repo_id: str, folder: Path) -> None:
    """Put files on the server without our validation (a broken or foreign artifact)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=server.url, token=TOKEN)
    api.create_repo(repo_id, exist_ok=True)
    ops = [CommitOperationAdd(p.name, str(p)) for p in folder.iterdir()]
    api.create_commit(repo_id, ops, commit_message="raw")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("tamper", "sha256"),
        ("unknown_major", "spec version 2.0 is not supported"),
        ("missing", "not in the folder"),
        ("no_artifact", "no laplace-hub artifact"),
    ],
)
def test_bad_remote_artifacts_fail_cleanly(server: HubServer, tmp_path: Path, damage: str, message: str) -> None:
    if damage == "tamper":
        upload_raw(server, "me/curv", VECTOR)
        server.state.tamper("me/curv", SHARDS[-1])
    elif damage == "unknown_major":
        upload_raw(server, "me/curv", CONFORMANCE / "invalid" / "unknown-major")
    elif damage == "missing":
        broken = tmp_path / "broken"
        shutil.copytree(VECTOR, broken)
        (broken / SHARDS[0]).unlink()
        upload_raw(server, "me/curv", broken)
    else:
        upload_raw(server, "me/curv", CONFORMANCE / "invalid" / "missing-manifest")
    local = tmp_path / "local"
    for extra in ([], ["--local-dir", str(local)]):
        result = cli(server, tmp_path / "home", "pull", "me/curv", *extra)
        assert result.returncode == 1, result.stdout
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # beside progress bars
        assert len(errors) == 1 and message in errors[0]
    assert not local.exists() and not list(local.parent.glob(".local.pull-*"))
    snapshots = list((tmp_path / "home" / "hub").glob("models--me--curv/snapshots/*/laplace*"))
    assert snapshots == []


def test_unknown_repo_and_revision(server: HubServer, tmp_path: Path) -> None:
    assert "not found" in cli(server, tmp_path, "pull", "me/nothing").stderr
    cli(server, tmp_path, "push", "me/curv", str(VECTOR), "--create-repo")
    result = cli(server, tmp_path, "pull", "me/curv@no-such-branch")
    assert result.returncode == 1 and "no-such-branch" in result.stderr
    result = cli(server, tmp_path, "push", "me/other", str(VECTOR))
    assert result.returncode == 1 and "--create-repo" in result.stderr


def test_two_processes_pull_the_same_artifact_at_once(server: HubServer, tmp_path: Path) -> None:
    assert cli(server, tmp_path, "push", "me/curv", str(VECTOR), "--create-repo").returncode == 0
    env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "shared"), "HF_HUB_OFFLINE": "0"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "laplace_hub.cli", "pull", "me/curv", "--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-500:] for o in outputs]
    paths = {json.loads(out)["path"] for out, _ in outputs}
    assert len(paths) == 1 and same_files(VECTOR, Path(paths.pop()))


def test_racing_pushes_on_one_parent_leave_one_commit(
    server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import HfApi

    HfApi(endpoint=server.url, token=TOKEN).create_repo("me/curv")
    barrier = threading.Barrier(2)
    original = HfApi.create_commit

    def both_read_the_head_first(self, *args, **kwargs):  # the real client, synchronised to race
        barrier.wait(timeout=30)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HfApi, "create_commit", both_read_the_head_first)
    outcomes: list[object] = []

    def attempt(folder: Path) -> None:
        try:
            outcomes.append(push(folder, "me/curv", hub=server.url, token=TOKEN))
        except HubError as e:
            outcomes.append(e)

    threads = [threading.Thread(target=attempt, args=(v,)) for v in (VECTOR, CONFORMANCE / "valid" / "weight-diag")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    errors = [o for o in outcomes if isinstance(o, HubError)]
    assert len(outcomes) == 2 and len(errors) == 1
    assert "moved while pushing" in str(errors[0])
    assert len(server.state.repos["me/curv"].commits) == 2


def test_local_folder_hub_push_pull_find(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    result = push(VECTOR, "me/curv", hub=hub, create_repo=True)
    assert result.commit_url.startswith("file://")
    for spec in (hub, f"file://{hub}"):
        artifact = pull("me/curv", hub=spec, local_dir=tmp_path / "copy")
        assert same_files(VECTOR, tmp_path / "copy")
        torch.testing.assert_close(
            artifact.block("model.layers.0.self_attn.q_proj").dense(),
            Artifact.open(VECTOR).block("model.layers.0.self_attn.q_proj").dense(),
        )
    from laplace_hub.hub import find

    found = find("example/model", hub=hub)
    assert [(f.repo_id, f.subfolder) for f in found] == [("me/curv", "")]
    from laplace_hub.cli.inspect_cmd import summarize

    assert (
        found[0].total_bytes
        == summarize(Artifact.open(VECTOR))["total_bytes"]
        == sum(f.stat().st_size for f in VECTOR.iterdir() if f.name != "laplace.json")
    )
    with pytest.raises(HubError, match="invalid repo id"):
        pull("../../etc", hub=hub)


def test_one_liner_from_repo_id_to_regularizer(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from laplace_hub.consumers import LaplaceRegularizer
    from laplace_hub.data import pad_batch
    from laplace_hub.manifest import BaseModelInfo
    from laplace_hub.models import select_targets
    from laplace_hub.producers import ComputeOptions, compute_artifact
    from tests.conftest import tiny_llama

    base = tiny_llama()
    batches = [pad_batch([[1, 2, 3, 4], [5, 6, 7]], 0)]
    artifact = compute_artifact(
        base,
        {"s": batches},
        select_targets(base, "q_proj"),
        ComputeOptions(dtype="float64"),
        BaseModelInfo(repo_id="tiny/base"),
    )
    artifact.save(tmp_path / "a")
    Artifact.open(tmp_path / "a").push_to_hub(
        "tiny/base", hub=tmp_path / "hub", path_in_repo="laplace", create_repo=True
    )
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    reg = LaplaceRegularizer.from_pretrained(
        "tiny/base", model=model, strength=1.0, subfolder="laplace", hub=tmp_path / "hub"
    )
    assert float(reg()) == 0.0 and len(reg.state_dict()) == 0
