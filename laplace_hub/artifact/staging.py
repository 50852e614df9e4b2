"""Staging folders beside a target, and swapping one in so that nothing is ever lost.

Every writer that makes a folder appear (save, compress, merge, compute's spill, pull, a local-hub
push) builds it in a hidden sibling ``.<name>.<kind>-<hex>`` and then swaps it in. A writer holds
an advisory lock (``flock``) on its staging folder while it lives, so the next writer can tell a
killed process's staging (lock free: removed) from a live one's (locked: left alone).

The swap is one ``renameat2(RENAME_EXCHANGE)`` on Linux, the atomic exchange the kernel offers: a
kill at any step leaves the old folder or the new one at the target, never neither, and the old
one lands in the staging folder, which is then removed. Where the exchange is missing it is two
renames with the old folder locked aside in between; a kill there leaves it aside, and the next
writer to the same target puts it back.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
# Staging of this and of earlier releases (8 characters, as tempfile.mkdtemp names them too).
_STAGING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|verify|spill|pull|push|old)-[0-9a-z_]{8,12}$")
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)


@contextmanager
def staging_folder(target: Path, kind: str) -> Iterator[Path]:
    """A fresh hidden sibling of ``target``, locked while in use and removed afterwards.

    Stale staging of the same target left by a killed writer is cleaned first. After
    :func:`replace_folder` swapped the staging folder in, its path holds the old target, which goes.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep(target)
    path = target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex[:12]}"
    path.mkdir()
    fd = os.open(path, _DIR_FLAGS)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def sweep(target: Path) -> None:
    """Remove staging of ``target`` whose writer is gone; put back an old folder a kill left aside."""
    try:
        names = os.listdir(target.parent)
    except OSError:
        return
    for name in names:
        match = _STAGING.match(name)
        if match is None or match["name"] != target.name:
            continue
        path = target.parent / name
        try:
            fd = os.open(path, _DIR_FLAGS)
        except OSError:  # a file or a link of that name: not ours
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live writer holds it
            os.close(fd)
            continue
        try:
            if match["kind"] == "old" and not os.path.lexists(target):
                os.rename(path, target)
            else:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass  # another sweeper got there first
        finally:
            os.close(fd)


def replace_folder(staged: Path, target: Path) -> None:
    """Put the folder ``staged`` at ``target``, replacing whatever is there, all or nothing.

    Readers see the old folder or the new one, never a mix nor nothing. ``staged`` must be a
    sibling of ``target`` (same file system); afterwards it holds the old target (or is gone).

    Raises:
        OSError: a rename failed (``target`` is then as it was).

    """
    if not os.path.lexists(target):
        os.rename(staged, target)
    elif not _exchange(staged, target):
        _replace_by_two_renames(staged, target)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically; False where the system or file system cannot."""
    if _renameat2 is None:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(second))


def _replace_by_two_renames(staged: Path, target: Path) -> None:
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
    fd = os.open(target, _DIR_FLAGS) if target.is_dir() and not target.is_symlink() else None
    try:
        if fd is not None:  # locked aside: a sweeper leaves it alone while this writer lives
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(target, old)
        try:
            os.rename(staged, target)
        except BaseException:
            os.rename(old, target)
            raise
        if fd is not None:
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    finally:
        if fd is not None:
            os.close(fd)


@contextmanager
def folder_lock(lock_file: Path, *, shared: bool = False) -> Iterator[bool]:
    """Hold ``flock`` on ``lock_file`` (created if missing); yields False where it cannot be created.

    Writers of one folder take it exclusively around their swap, readers shared around reading
    a consistent copy; a read-only location has nothing to lock against and yields False.
    """
    try:
        fd = os.open(lock_file, _LOCK_FLAGS, 0o644)
    except OSError:
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)
