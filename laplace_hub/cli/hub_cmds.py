"""``laplace-hub push``, ``pull`` and ``find``: the hub layer on the command line.

The token is taken the way huggingface_hub takes it (``HF_TOKEN``, ``hf auth login``) and never
printed. ``--hub`` names a local folder / ``file://`` URL or another endpoint instead of the Hub.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from laplace_hub.cli._common import add_command, human_bytes, print_json
from laplace_hub.errors import HubError

HUB_HELP = "a local folder or file:// URL acting as the hub, or an http(s) endpoint (default: HF_ENDPOINT)"
TOKEN_HELP = "a Hugging Face token (default: HF_TOKEN or the one `hf auth login` saved); never printed"


def register(sub: Any) -> None:
    """Add the three commands to the CLI."""
    p = add_command(
        sub,
        "push",
        "Validate an artifact and publish it, with a model card, as one commit (arguments as `hf upload`).",
        "  laplace-hub push me/smollm2-laplace ./artifact --create-repo\n"
        "  laplace-hub push HuggingFaceTB/SmolLM2-135M-Instruct ./artifact --path-in-repo laplace --create-pr\n"
        "  laplace-hub push me/curvature ./artifact --hub ./local-hub --create-repo --json",
    )
    p.add_argument("repo_id", help="owner/name")
    p.add_argument("folder", help="the artifact folder")
    p.add_argument("--hub", help=HUB_HELP)
    p.add_argument("--path-in-repo", default="", help="subfolder in the repo, e.g. laplace")
    p.add_argument("--revision", help="branch to commit to (default main)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead")
    p.add_argument("--create-repo", action="store_true", help="create the repo if missing")
    p.add_argument("--private", action="store_true", help="with --create-repo: make it private")
    p.add_argument("--commit-message", help="commit message (default: says what the artifact is)")
    p.add_argument("--message", dest="old_message", help=argparse.SUPPRESS)  # before 0.2: --commit-message
    p.add_argument("--token", help=TOKEN_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(
        run=run_push, flags={"revision": "--revision", "create_pr": "--create-pr", "create_repo": "--create-repo"}
    )

    p = add_command(
        sub,
        "pull",
        "Download an artifact (only its files), pinned to a commit, verified (checksums, values) before use.",
        "  laplace-hub pull me/smollm2-laplace\n"
        "  laplace-hub pull HuggingFaceTB/SmolLM2-135M-Instruct@v1.0 --subfolder laplace --local-dir ./pulled\n"
        "  HF_HUB_OFFLINE=1 laplace-hub pull me/smollm2-laplace --json   # from the cache",
    )
    p.add_argument("repo", help="owner/name[@revision]")
    p.add_argument("--revision", help="branch, tag or commit sha (the same as owner/name@revision)")
    p.add_argument("--subfolder", default="", help="the artifact's folder inside the repo, e.g. laplace")
    p.add_argument("--hub", help=HUB_HELP)
    p.add_argument("--local-dir", help="put the files here instead of the Hugging Face cache")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a --local-dir that holds anything but an unchanged earlier pull (e.g. your own artifact)",
    )
    p.add_argument("--cache-dir", help="the Hugging Face cache to use")
    p.add_argument("--token", help=TOKEN_HELP)
    p.add_argument(
        "--timeout",
        type=float,
        help="seconds the whole pull from a Hub may take (default: a minute plus 1 s per 256 KiB it lists)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run_pull, flags={"overwrite": "--overwrite", "subfolder": "--subfolder"})

    p = add_command(
        sub,
        "find",
        "List artifacts for a base model: tagged repos and the base model's own repo.",
        "  laplace-hub find --base-model HuggingFaceTB/SmolLM2-135M-Instruct\n"
        "  laplace-hub find --base-model my/model --hub ./local-hub --json",
    )
    p.add_argument("--base-model", required=True)
    p.add_argument("--hub", help=HUB_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run_find)


def run_push(args: argparse.Namespace) -> int:
    """Push and print the commit URL and sha."""
    from laplace_hub.hub import push

    if Path(args.repo_id).is_dir() and not Path(args.folder).is_dir():  # before 0.2: push FOLDER REPO
        args.folder, args.repo_id = args.repo_id, args.folder
        print(
            "note: `push FOLDER REPO` is deprecated and goes in 0.3; use `push REPO FOLDER` (as `hf upload`)",
            file=sys.stderr,
        )
    if args.old_message:
        print("note: --message is deprecated and goes in 0.3; use --commit-message (as `hf upload`)", file=sys.stderr)
    result = push(
        args.folder,
        args.repo_id,
        hub=args.hub,
        path_in_repo=args.path_in_repo,
        revision=args.revision,
        create_pr=args.create_pr,
        create_repo=args.create_repo,
        private=args.private,
        commit_message=args.commit_message or args.old_message,
        token=args.token,
    )
    if args.json:
        print_json(result.__dict__)
    else:
        print(f"pushed {args.folder} to {args.repo_id}: commit {result.commit_sha}")
        print(result.pr_url or result.commit_url)
    return 0


def run_pull(args: argparse.Namespace) -> int:
    """Pull and print where the verified artifact is."""
    from laplace_hub.hub import pull, split_repo_revision

    repo_id, revision = split_repo_revision(args.repo)
    if args.revision is not None and revision not in (None, args.revision):
        raise HubError(f"two revisions: {args.repo} and --revision {args.revision}; give one", location="revision")
    revision = args.revision or revision
    artifact = pull(
        repo_id,
        revision=revision,
        subfolder=args.subfolder,
        hub=args.hub,
        local_dir=args.local_dir,
        cache_dir=args.cache_dir,
        overwrite=args.overwrite,
        timeout=args.timeout,
        token=args.token,
    )
    summary = {
        "path": str(artifact.path),
        "repo_id": repo_id,
        "revision": artifact.origin.revision,
        "subfolder": args.subfolder,
        "bytes": artifact.nbytes(),
        "modules": len(artifact.manifest.modules),
    }
    if args.json:
        print_json(summary)
    else:
        print(
            f"{repo_id}@{summary['revision']}: {summary['modules']} modules, {human_bytes(summary['bytes'])}, "
            "checksums and values verified"
        )
        print(summary["path"])
    return 0


def run_find(args: argparse.Namespace) -> int:
    """List what was found."""
    from laplace_hub.hub import find

    found = find(args.base_model, hub=args.hub)
    if args.json:
        print_json([f.to_json() for f in found])
        return 0
    if not found:
        print(f"no laplace-hub artifacts found for {args.base_model}")
    for f in found:
        where = f"{f.repo_id}" + (f" --subfolder {f.subfolder}" if f.subfolder else "")
        print(
            f"{where:<50} {','.join(f.structures):<16} {f.parameterization:<7} {human_bytes(f.total_bytes):>10}  "
            f"{(f.last_modified or '')[:10]}"
        )
    return 0
