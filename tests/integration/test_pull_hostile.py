"""A pull from a hostile hub: links, FIFOs, forged sizes, NaNs, a user's folder, a shared cache.

Every case uses real files, links and FIFOs; each asserts the error class, that the message names
what and where, and that nothing is left behind: no staging folder beside ``local_dir``, no
partial ``local_dir``, no unverified files in the Hugging Face cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from laplace_hub.errors import ArtifactError, ChecksumError, HubError, LaplaceHubError, ModelMismatchError
from laplace_hub.hub import pull, push
from laplace_hub.hub.pull import PULL_RECORD
from laplace_hub.validate import validate
from tests.conftest import CONFORMANCE
from tests.hub_server import HubServer

TOKEN = "hf_secret_never_printed"
SHARDED = CONFORMANCE / "valid" / "weight-kron-sharded"
SINGLE = CONFORMANCE / "valid" / "weight-kron"
NAN = CONFORMANCE / "invalid" / "nan"  # NaN in a factor, every checksum correct
SHARD = "laplace-00002-of-00002.safetensors"
ARTIFACT_FILES = {
    "laplace.json",
    "laplace.safetensors.index.json",
    "laplace-00001-of-00002.safetensors",
    "laplace-00002-of-00002.safetensors",
}


def hub_with(tmp_path: Path, vector: Path = SHARDED, sub: str = "laplace") -> tuple[Path, Path]:
    """A local hub holding ``vector`` at ``me/curv/<sub>``; returns the hub and the artifact folder."""
    hub = tmp_path / "hub"
    folder = hub / "me" / "curv" / sub
    shutil.copytree(vector, folder)
    return hub, folder


def nothing_left(local: Path) -> None:
    assert not os.path.lexists(local)
    assert sorted(p.name for p in local.parent.glob(f".{local.name}.*")) == []


def refresh(folder: Path, name: str, size: int | None = None) -> None:
    """Record a file's size (or a forged one) and sha256 in the manifest, as spec/make_conformance.py does."""
    manifest = json.loads((folder / "laplace.json").read_text())
    path = folder / name
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if size is None else "0" * 64
    manifest["files"][name] = {"size": path.stat().st_size if size is None else size, "sha256": digest}
    (folder / "laplace.json").write_text(json.dumps(manifest, indent=2) + "\n")


# --- local folder hub: what is copied ---------------------------------------------------------------


def test_copies_only_the_listed_files_and_a_regular_card(tmp_path: Path) -> None:
    hub, folder = hub_with(tmp_path)
    (folder / "README.md").write_text("# card\n")
    (folder / ".hidden").write_text("secret")
    (folder / "extra.bin").write_bytes(b"\0" * 10)
    (folder / "laplace-notes").mkdir()
    local = tmp_path / "out" / "local"
    artifact = pull("me/curv", subfolder="laplace", hub=hub, local_dir=local)
    assert {p.name for p in local.iterdir()} == ARTIFACT_FILES | {"README.md", PULL_RECORD}
    assert all((local / n).read_bytes() == (folder / n).read_bytes() for n in ARTIFACT_FILES)
    assert artifact.path == local and artifact.origin.subfolder == "laplace"
    assert sorted(p.name for p in local.parent.iterdir()) == ["local"]  # no staging or old folder


@pytest.mark.parametrize("card", ["link", "fifo", "large"])
def test_a_card_that_is_not_a_small_regular_file_is_not_copied(tmp_path: Path, card: str) -> None:
    hub, folder = hub_with(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("the password")
    if card == "link":
        (folder / "README.md").symlink_to(secret)
    elif card == "fifo":
        os.mkfifo(folder / "README.md")  # opened with O_NONBLOCK: must not hang
    else:
        (folder / "README.md").write_bytes(b"#" * (2**20 + 1))
    local = tmp_path / "local"
    pull("me/curv", subfolder="laplace", hub=hub, local_dir=local)
    assert {p.name for p in local.iterdir()} == ARTIFACT_FILES | {PULL_RECORD}
    assert all(b"the password" not in p.read_bytes() for p in local.iterdir())


# --- local folder hub: links and special files are refused ------------------------------------------


@pytest.mark.parametrize("level", ["owner", "repo", "subfolder"])
@pytest.mark.parametrize("into", [True, False])
def test_a_linked_folder_is_refused_naming_it(tmp_path: Path, level: str, into: bool) -> None:
    hub, folder = hub_with(tmp_path)
    link = {"owner": hub / "me", "repo": hub / "me" / "curv", "subfolder": folder}[level]
    outside = tmp_path / "outside"
    shutil.move(link, outside)
    link.symlink_to(outside, target_is_directory=True)
    local = tmp_path / "local"
    with pytest.raises(HubError, match="symbolic link") as caught:
        pull("me/curv", subfolder="laplace", hub=hub, local_dir=local if into else None)
    assert str(link) in str(caught.value)
    nothing_left(local)


@pytest.mark.parametrize("kind", ["link", "fifo", "folder", "device"])
@pytest.mark.parametrize("name", [SHARD, "laplace.json"])
@pytest.mark.parametrize("into", [True, False])
def test_a_listed_file_that_is_not_regular_is_refused_naming_it(
    tmp_path: Path, kind: str, name: str, into: bool
) -> None:
    hub, folder = hub_with(tmp_path)
    real = tmp_path / f"real-{name}"
    shutil.move(folder / name, real)
    if kind == "link":
        (folder / name).symlink_to(real)  # the very same bytes, but through a link
    elif kind == "fifo":
        os.mkfifo(folder / name)
    elif kind == "folder":
        (folder / name).mkdir()
    else:
        try:
            os.mknod(folder / name, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null
        except PermissionError:
            pytest.skip("no permission to create a device node here")
    local = tmp_path / "local"
    with pytest.raises(HubError, match=re.escape(f"me/curv/laplace: {name}: is a")) as caught:
        pull("me/curv", subfolder="laplace", hub=hub, local_dir=local if into else None)
    assert "regular files only" in str(caught.value)
    nothing_left(local)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file anyway")
def test_an_unreadable_file_is_a_hub_error(tmp_path: Path) -> None:
    hub, folder = hub_with(tmp_path)
    (folder / SHARD).chmod(0)
    local = tmp_path / "local"
    with pytest.raises(HubError, match=re.escape(f"{SHARD}: cannot be read")):
        pull("me/curv", subfolder="laplace", hub=hub, local_dir=local)
    nothing_left(local)


def test_os_failures_end_as_hub_errors(tmp_path: Path) -> None:
    hub, _ = hub_with(tmp_path)
    with pytest.raises(HubError, match="not a readable folder"):
        pull("me/curv", subfolder="laplace", hub=tmp_path / "no-hub")
    with pytest.raises(HubError, match="no laplace-hub artifact at me/curv/nothing"):
        pull("me/curv", subfolder="nothing", hub=hub)
    (hub / "me" / "other").write_text("a file where a repo should be")
    with pytest.raises(HubError, match="is not a folder"):
        pull("me/other", hub=hub)
    (tmp_path / "file").write_text("")
    with pytest.raises(HubError, match="pull of me/curv failed"):  # local_dir under a file: NotADirectoryError
        pull("me/curv", subfolder="laplace", hub=hub, local_dir=tmp_path / "file" / "local")


# --- forged sizes: refused before anything is hashed or copied --------------------------------------


@pytest.mark.parametrize("into", [True, False])
def test_a_sparse_file_of_another_size_is_refused_before_reading(tmp_path: Path, into: bool) -> None:
    hub, folder = hub_with(tmp_path)
    with (folder / SHARD).open("r+b") as f:
        f.truncate(2 * 2**30)  # 2 GiB, no disk used
    local = tmp_path / "local"
    with pytest.raises(
        ChecksumError, match=re.escape(f"me/curv/laplace: {SHARD}: is 2147483648 bytes, the manifest says 304")
    ):
        pull("me/curv", subfolder="laplace", hub=hub, local_dir=local if into else None)
    nothing_left(local)


def test_sizes_beyond_what_the_tensors_need_are_refused_before_reading(tmp_path: Path) -> None:
    hub, folder = hub_with(tmp_path)
    with (folder / SHARD).open("r+b") as f:
        f.truncate(2 * 2**30)
    refresh(folder, SHARD, size=2 * 2**30)  # the manifest agrees with the forged file's size
    local = tmp_path / "local"
    with pytest.raises(ArtifactError, match=r"me/curv/laplace: files: the manifest declares .* more than its tensors"):
        pull("me/curv", subfolder="laplace", hub=hub, local_dir=local)
    nothing_left(local)


# --- values are verified, not only checksums ----------------------------------------------------------


@pytest.mark.parametrize("into", [True, False])
def test_nan_values_with_correct_checksums_are_refused(tmp_path: Path, into: bool) -> None:
    assert validate(NAN, checksums=True, values=False).valid  # the checksums are right
    hub, _ = hub_with(tmp_path, NAN)
    local = tmp_path / "a" / "b" / "local"
    with pytest.raises(ArtifactError, match=r"me/curv/laplace: .*NaN") as caught:
        pull("me/curv", subfolder="laplace", hub=hub, local_dir=local if into else None)
    assert caught.value.code == "value.non_finite"
    assert not (tmp_path / "a").exists()  # not even the parents it made


# --- local_dir: a user's folder is not replaced -----------------------------------------------------


def test_a_local_dir_holding_other_files_is_refused_unless_overwrite(tmp_path: Path) -> None:
    hub, _ = hub_with(tmp_path)
    local = tmp_path / "local"
    local.mkdir()
    (local / "thesis.tex").write_text("years of work")
    with pytest.raises(HubError, match=r"local_dir holds 'thesis.tex'.*overwrite") as caught:
        pull("me/curv", subfolder="laplace", hub=hub, local_dir=local)
    assert str(local) in str(caught.value)
    assert [p.name for p in local.iterdir()] == ["thesis.tex"]
    assert sorted(p.name for p in tmp_path.glob(".local.*")) == []
    pull("me/curv", subfolder="laplace", hub=hub, local_dir=local, overwrite=True)
    assert {p.name for p in local.iterdir()} == ARTIFACT_FILES | {PULL_RECORD}
    pull("me/curv", subfolder="laplace", hub=hub, local_dir=local)  # an earlier pull: replaced freely
    (tmp_path / "a-file").write_text("")
    with pytest.raises(HubError, match="is a file, not a folder"):
        pull("me/curv", subfolder="laplace", hub=hub, local_dir=tmp_path / "a-file")


def test_the_cli_says_so_in_one_line_and_takes_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from laplace_hub.cli import main

    hub, _ = hub_with(tmp_path)
    local = tmp_path / "local"
    local.mkdir()
    (local / "notes.txt").write_text("mine")
    args = ["pull", "me/curv", "--subfolder", "laplace", "--hub", str(hub), "--local-dir", str(local)]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and "--overwrite" in err
    assert main([*args, "--overwrite", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(local)


# --- a local hub's revision is a content id ---------------------------------------------------------


def test_a_local_hubs_revision_is_the_manifests_sha256(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    pushed = push(SINGLE, "me/curv", hub=hub, create_repo=True)
    first = pull("me/curv", hub=hub).origin.revision
    assert first == pushed.commit_sha == hashlib.sha256((SINGLE / "laplace.json").read_bytes()).hexdigest()
    assert pull("me/curv", hub=hub, local_dir=tmp_path / "copy").origin.revision == first  # same tree, same id
    changed = tmp_path / "changed"
    shutil.copytree(SINGLE, changed)
    path = changed / "laplace.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] * 2  # still a valid (PSD) factor, other bytes
    save_file(tensors, path, metadata=metadata)
    refresh(changed, "laplace.safetensors")
    push(changed, "me/curv", hub=hub)
    assert pull("me/curv", hub=hub).origin.revision not in (first, None)


# --- LaplaceRegularizer.from_pretrained splits its keyword arguments --------------------------------


def test_from_pretrained_passes_consumer_arguments_to_from_artifact(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from laplace_hub.consumers import LaplaceRegularizer
    from laplace_hub.data import pad_batch
    from laplace_hub.manifest import BaseModelInfo
    from laplace_hub.models import select_targets
    from laplace_hub.producers import ComputeOptions, compute_artifact
    from tests.conftest import tiny_llama

    base = tiny_llama()
    artifact = compute_artifact(
        base,
        {"s": [pad_batch([[1, 2, 3, 4], [5, 6, 7]], 0)]},
        select_targets(base, "q_proj"),
        ComputeOptions(dtype="float64"),
        BaseModelInfo(repo_id="tiny/base"),
    )
    artifact.save(tmp_path / "a")
    push(tmp_path / "a", "tiny/base", hub=tmp_path / "hub", path_in_repo="laplace", create_repo=True)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    common = {"model": model, "strength": 1.0, "subfolder": "laplace", "hub": tmp_path / "hub"}
    reg = LaplaceRegularizer.from_pretrained(
        "tiny/base", adapter="default", on_unmatched="error", check_fingerprint=True, cross=False, **common
    )
    assert float(reg().detach()) == 0.0
    with pytest.raises(ModelMismatchError):  # reached from_artifact: no adapter of that name
        LaplaceRegularizer.from_pretrained("tiny/base", adapter="other", on_unmatched="error", **common)


# --- the Hub: values verified, sizes checked before download, cache cleaned through its API ---------


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with HubServer() as hub:
        yield hub


def commit(server: HubServer, files: dict[str, bytes]) -> str:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=server.url, token=TOKEN)
    api.create_repo("me/curv", exist_ok=True)
    return api.create_commit(
        "me/curv", [CommitOperationAdd(path, data) for path, data in files.items()], commit_message="raw"
    ).oid


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def snapshot(cache: Path, sha: str) -> Path:
    return cache / "models--me--curv" / "snapshots" / sha


@pytest.mark.hub
def test_a_remote_subfolder_lands_in_local_dir_as_just_its_files(server: HubServer, tmp_path: Path) -> None:
    files = {"config.json": b"{}", "laplace/README.md": b"# card\n", "laplace/extra.bin": b"x"}
    sha = commit(server, {**files, **{f"laplace/{n}": d for n, d in folder_files(SHARDED).items()}})
    local = tmp_path / "local"
    artifact = pull("me/curv", subfolder="laplace", hub=server.url, local_dir=local, token=TOKEN)
    assert artifact.origin.revision == sha and artifact.path == local
    assert {p.name for p in local.iterdir()} == ARTIFACT_FILES | {PULL_RECORD}  # no .cache, no config, no extra
    assert all((local / n).read_bytes() == (SHARDED / n).read_bytes() for n in ARTIFACT_FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local"]


@pytest.mark.hub
def test_a_failed_pull_keeps_the_blobs_another_cached_revision_uses(
    server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    cache = tmp_path / "cache"
    good = commit(server, folder_files(SHARDED))
    pull("me/curv", hub=server.url, cache_dir=cache, token=TOKEN)
    broken = folder_files(SHARDED)
    broken[SHARD] = broken[SHARD][:-1] + bytes([broken[SHARD][-1] ^ 0xFF])  # same size, other sha256
    bad = commit(server, broken)  # shares laplace.json, the index and the first shard with `good`
    with pytest.raises(ChecksumError, match=re.escape(f"me/curv@main: {SHARD}: sha256")):
        pull("me/curv", hub=server.url, cache_dir=cache, token=TOKEN)
    assert not snapshot(cache, bad).exists()
    assert all(p.resolve().is_file() for p in snapshot(cache, good).iterdir())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    again = pull("me/curv", revision=good, hub=server.url, cache_dir=cache)
    assert again.origin.revision == good
    assert all((again.path / n).read_bytes() == (SHARDED / n).read_bytes() for n in ARTIFACT_FILES)


@pytest.mark.hub
def test_a_nan_artifact_is_refused_and_only_its_files_leave_the_cache(server: HubServer, tmp_path: Path) -> None:
    from huggingface_hub import hf_hub_download

    cache = tmp_path / "cache"
    sha = commit(server, {"config.json": b"{}", **{f"laplace/{n}": d for n, d in folder_files(NAN).items()}})
    hf_hub_download("me/curv", "config.json", cache_dir=cache, endpoint=server.url, token=TOKEN)
    local = tmp_path / "local"
    for into in (local, None):
        with pytest.raises(ArtifactError, match=r"me/curv@main/laplace: .*NaN") as caught:
            pull("me/curv", subfolder="laplace", hub=server.url, cache_dir=cache, local_dir=into, token=TOKEN)
        assert caught.value.code == "value.non_finite"
    nothing_left(local)
    assert [p.name for p in snapshot(cache, sha).rglob("*") if p.is_file()] == ["config.json"]
    assert len(list((cache / "models--me--curv" / "blobs").iterdir())) == 1  # the config's blob only


@pytest.mark.hub
def test_a_file_the_hub_lists_at_another_size_is_not_downloaded(server: HubServer, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    files = folder_files(SHARDED)
    files[SHARD] += b"\0" * 4096
    commit(server, files)
    local = tmp_path / "local"
    for into in (local, None):
        with pytest.raises(ChecksumError, match=re.escape(f"{SHARD}: is 4400 bytes on the hub, the manifest says 304")):
            pull("me/curv", hub=server.url, cache_dir=cache, local_dir=into, token=TOKEN)
    nothing_left(local)
    assert list(cache.rglob("*.safetensors")) == []


def test_every_failure_is_a_library_error(tmp_path: Path) -> None:
    hub, folder = hub_with(tmp_path)
    (folder / "laplace.json").write_text("[" * 100_000 + "]" * 100_000)  # deep enough to recurse
    with pytest.raises(LaplaceHubError):
        pull("me/curv", subfolder="laplace", hub=hub, local_dir=tmp_path / "local")
    nothing_left(tmp_path / "local")


# --- a lying endpoint: nothing outside, no hang, one HubError line, nothing left ------------------


def _nothing_outside(tmp_path: Path, word: str) -> None:
    assert not [p for p in tmp_path.rglob(f"*{word}*")], f"a server-chosen name reached the disk: {word}"


def _cache_holds_no_artifact(cache: Path) -> None:
    assert not [p for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")]


@pytest.mark.hub
@pytest.mark.parametrize("into", [True, False], ids=["local_dir", "cache"])
def test_a_server_etag_never_becomes_a_path(server: HubServer, tmp_path: Path, into: bool) -> None:
    """huggingface_hub names cache blobs by the ETag; laplace-hub names them by the sha256 it verified."""
    commit(server, folder_files(SHARDED))
    server.state.lies = {"etag": '"../../../../../../etag-pwned"'}
    cache, local = tmp_path / "cache", tmp_path / "local"
    artifact = pull("me/curv", hub=server.url, cache_dir=cache, local_dir=local if into else None, token=TOKEN)
    assert all((artifact.path / n).read_bytes() == (SHARDED / n).read_bytes() for n in ARTIFACT_FILES)
    _nothing_outside(tmp_path, "pwned")


LIES = {
    "sha": ({"sha": "../../../sha-pwned"}, HubError, "not a 40-hex commit sha"),
    "commit-header": ({"commit": "f" * 40}, HubError, "from commit 'ffff"),
    "truncated": ({"truncate": True}, HubError, "broke off sending"),
    "huge-length": ({"content_length": 10 * 2**30}, ChecksumError, "announces 10737418240 bytes"),
    "redirect-loop": ({"redirect_loop": True}, HubError, "redirected .* in a loop"),
    "drip": ({"drip": 0.1}, HubError, "took longer than 2 s"),
}


@pytest.mark.hub
@pytest.mark.parametrize("lie", sorted(LIES))
@pytest.mark.parametrize("into", [True, False], ids=["local_dir", "cache"])
def test_a_lying_server_ends_in_one_error_and_leaves_nothing(
    server: HubServer, tmp_path: Path, lie: str, into: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    from laplace_hub.cli import main

    commit(server, folder_files(SHARDED))
    server.state.lies, error, message = LIES[lie]
    timeout = 2 if lie == "drip" else 300  # the drip outlasts 2 s however loaded the machine; others need no clock
    cache, local = tmp_path / "cache", tmp_path / "local"
    with pytest.raises(error, match=message):
        pull(
            "me/curv", hub=server.url, cache_dir=cache, local_dir=local if into else None, token=TOKEN, timeout=timeout
        )
    nothing_left(local)
    _cache_holds_no_artifact(cache)
    _nothing_outside(tmp_path, "pwned")
    args = ["pull", "me/curv", "--hub", server.url, "--cache-dir", str(cache), "--timeout", str(timeout)]
    capsys.readouterr()  # the commit's upload bars
    assert main([*args, *(["--local-dir", str(local)] if into else [])]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and "internal error" not in err, err


@pytest.mark.hub
def test_a_manifest_listing_more_shards_than_tensors_is_refused_before_any_download(
    server: HubServer, tmp_path: Path
) -> None:
    files = folder_files(SHARDED)
    manifest = json.loads(files["laplace.json"])
    for i in range(3, 10_003):  # 10,000 more shards, each 8 bytes, none of them on the hub
        manifest["files"][f"laplace-{i:05d}-of-10002.safetensors"] = {"size": 8, "sha256": "0" * 64}
    files["laplace.json"] = json.dumps(manifest).encode()
    commit(server, files)
    with pytest.raises(ArtifactError, match="lists 10002 tensor files for 3 tensors"):
        pull("me/curv", hub=server.url, cache_dir=tmp_path / "cache", local_dir=tmp_path / "local", token=TOKEN)
    nothing_left(tmp_path / "local")


@pytest.mark.hub
def test_offline_pull_into_local_dir_from_a_warm_cache(
    server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The air-gapped fine-tuner: pre-fetch into the cache online, then pull into a folder offline."""
    import huggingface_hub.constants

    cache, local = tmp_path / "cache", tmp_path / "local"
    sha = commit(server, {f"laplace/{n}": d for n, d in folder_files(SHARDED).items()})
    pull("me/curv", subfolder="laplace", hub=server.url, cache_dir=cache, token=TOKEN)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    artifact = pull("me/curv", subfolder="laplace", hub=server.url, cache_dir=cache, local_dir=local)
    assert artifact.origin.revision == sha and artifact.path == local
    assert all((local / n).read_bytes() == (SHARDED / n).read_bytes() for n in ARTIFACT_FILES)
    assert not any(p.is_symlink() for p in local.iterdir())  # copies, not links into the cache
    with pytest.raises(HubError, match="not in the cache"):
        pull("me/other", hub=server.url, cache_dir=cache, local_dir=tmp_path / "other")
    nothing_left(tmp_path / "other")


def test_a_server_that_never_answers_ends_in_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It accepts the connection and stays silent: the pull's deadline covers its very first request."""
    import socket
    import threading

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(listener.accept()[0]), daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        with pytest.raises(HubError, match="cannot be reached"):
            pull("me/curv", hub=url, cache_dir=tmp_path / "cache", local_dir=tmp_path / "local", timeout=2)
    finally:
        listener.close()
        for connection in held:
            connection.close()
    nothing_left(tmp_path / "local")


@pytest.mark.hub
def test_a_cache_snapshot_missing_a_file_is_fetched_again(server: HubServer, tmp_path: Path) -> None:
    """A kill (or `hf download` of the manifest alone) can leave a snapshot short; it is not a cache hit."""
    cache = tmp_path / "cache"
    sha = commit(server, folder_files(SHARDED))
    pull("me/curv", hub=server.url, cache_dir=cache, token=TOKEN)
    (snapshot(cache, sha) / SHARD).unlink()
    again = pull("me/curv", hub=server.url, cache_dir=cache, token=TOKEN)
    assert (again.path / SHARD).read_bytes() == (SHARDED / SHARD).read_bytes()


@pytest.mark.hub
def test_an_artifact_at_a_repos_root_pulls_from_the_cache_beside_the_models_files(
    server: HubServer, tmp_path: Path
) -> None:
    from huggingface_hub import hf_hub_download

    cache = tmp_path / "cache"
    commit(server, {"config.json": b"{}", **folder_files(SHARDED)})
    pull("me/curv", hub=server.url, cache_dir=cache, token=TOKEN)
    hf_hub_download("me/curv", "config.json", cache_dir=cache, endpoint=server.url, token=TOKEN)
    again = pull("me/curv", hub=server.url, cache_dir=cache, token=TOKEN)  # a cache hit, config.json beside it
    module = next(iter(again.manifest.modules))
    assert again.block(module) is not None and (again.path / "config.json").exists()
