"""Kill a writer at every file-system step and report what a user would find.

    python -m tests.integration.kill_steps OP WORK [--two-renames]

``WORK`` holds ``old/`` and ``new/`` (two artifacts) and, for ``push`` and ``pull``, a local hub.
For step ``n = 1, 2, …`` the process forks a child that runs the operation ``OP`` (``save``: the
new artifact saved over the old one; ``push``: the new one pushed over the old one in a local hub;
``pull``: the new one pulled over an earlier pull of the old one) and sends itself SIGKILL at its
``n``-th file-system step (mkdir, rename, exchange, replace, unlink, rmtree, fsync). After each kill
the parent records what is at the target (``old``, ``new``, ``absent`` or ``other``), and again after
the sweep every writer starts with, then reruns
the operation in full, unkilled, and records what is left beside the target. It stops at the first
``n`` the child completes. Prints one JSON object.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from laplace_hub.artifact import Artifact, staging
from laplace_hub.hub import pull, push

MAX_STEPS = 200
_STEPS: list[tuple[Any, str]] = [
    (os, "mkdir"),
    (os, "rename"),
    (os, "replace"),
    (os, "unlink"),
    (os, "fsync"),
    (shutil, "rmtree"),
    (staging, "_exchange"),
]


def _kill_at(step: int) -> None:
    """Make the ``step``-th file-system call of this process its last."""
    count = 0

    def hooked(original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            nonlocal count
            count += 1
            if count == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)

        return call

    for owner, name in _STEPS:
        setattr(owner, name, hooked(getattr(owner, name)))


def _manifest_id(folder: Path) -> str | None:
    try:
        return hashlib.sha256((folder / "laplace.json").read_bytes()).hexdigest()
    except OSError:
        return None


def main() -> None:
    op, work = sys.argv[1], Path(sys.argv[2])
    if len(sys.argv) > 3 and sys.argv[3] == "--two-renames":  # as on a system without renameat2
        staging._renameat2 = None
    hub = work / "hub"
    target = {"save": work / "out", "push": hub / "me" / "curv", "pull": work / "pulled"}[op]
    operations: dict[str, Callable[[], object]] = {
        "save": lambda: Artifact.open(work / "new").save(target, overwrite=True, verify=True),
        "push": lambda: push(work / "new", "me/curv", hub=hub, create_repo=True),
        "pull": lambda: pull("me/curv", hub=hub, local_dir=target),
    }

    def reset() -> None:
        """The target holds the old artifact (for pull: an earlier pull of it), the source the new one."""
        shutil.rmtree(work / "out", ignore_errors=True)
        shutil.rmtree(hub, ignore_errors=True)
        shutil.rmtree(work / "pulled", ignore_errors=True)
        if op == "save":
            shutil.copytree(work / "old", target)
        elif op == "push":
            shutil.copytree(work / "old", target)
        else:
            shutil.copytree(work / "old", hub / "me" / "curv")
            pull("me/curv", hub=hub, local_dir=target)
            shutil.rmtree(hub / "me" / "curv")
            shutil.copytree(work / "new", hub / "me" / "curv")

    ids = {_manifest_id(work / "old"): "old", _manifest_id(work / "new"): "new"}
    report: list[dict[str, Any]] = []
    for step in range(1, MAX_STEPS + 1):
        reset()
        pid = os.fork()
        if pid == 0:
            _kill_at(step)
            try:
                operations[op]()
            except BaseException:
                os._exit(3)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status)
        found = "absent" if not os.path.lexists(target) else ids.get(_manifest_id(target), "other")
        after_kill = sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))
        staging.sweep(target)  # what the next writer does first
        swept = "absent" if not os.path.lexists(target) else ids.get(_manifest_id(target), "other")
        operations[op]()  # the next run, unkilled
        rerun = ids.get(_manifest_id(target), "other")
        left = sorted(
            p.name
            for p in target.parent.iterdir()
            if p.name.startswith(f".{target.name}.") and not p.name.endswith(".lock")
        )
        report.append(
            {
                "step": step,
                "killed": killed,
                "exit": None if killed else os.WEXITSTATUS(status),
                "found": found,
                "staging_after_kill": after_kill,
                "found_after_sweep": swept,
                "after_rerun": rerun,
                "left_after_rerun": left,
            }
        )
        if not killed:
            break
    print(json.dumps(report))


if __name__ == "__main__":
    main()
