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
import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; staging is then never swept (it cannot tell live from dead)
    fcntl = None  # type: ignore[assignment]

_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_STAGING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>new|tmp|verify|spill|pull|push|old)-[0-9a-f]{12}$")
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform.startswith("linux") else None


@contextmanager
def staging_folder(target: Path, kind: str) -> Iterator[Path]:
    """A fresh hidden sibling of ``target``, locked while in use and removed afterwards.

    Stale staging of the same target left by a killed writer is cleaned first. After
    :func:`replace_folder` swapped the staging folder in, its path holds the old target, which goes.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep(target)
    fd, path = _locked_folder(target, kind)
    try:
        yield path
    finally:
        _remove(path)
        os.close(fd)


def _locked_folder(target: Path, kind: str) -> tuple[int, Path]:
    """Make ``.<name>.new-<id>``, lock it, then rename it to ``.<name>.<kind>-<id>``.

    A sweeper removes only an empty, unlocked ``new`` folder; should it take this one before it is
    locked, the rename fails and a fresh one is made.
    """
    for _ in range(8):
        unique = uuid.uuid4().hex[:12]
        fresh = target.parent / f".{target.name}.new-{unique}"
        fresh.mkdir()
        try:
            fd = os.open(fresh, _DIR_FLAGS)
        except FileNotFoundError:
            continue
        _lock(fd, blocking=True)
        path = target.parent / f".{target.name}.{kind}-{unique}"
        try:
            os.rename(fresh, path)
        except FileNotFoundError:
            os.close(fd)
            continue
        return fd, path
    raise OSError(errno.EAGAIN, "staging folders kept vanishing (another process sweeping?)", str(target.parent))


def _remove(path: Path) -> None:
    """Remove what a staging path holds after a swap: the old folder, or the file or link it was."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink(missing_ok=True)


def _lock(fd: int, *, blocking: bool, shared: bool = False) -> bool:
    """``flock``; False where it is held by another (non-blocking) or the system has no locks (NFS nolock)."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
            return False
        raise
    return True


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
        if not _lock(fd, blocking=False):  # a live writer holds it (or nothing can tell: leave it)
            os.close(fd)
            continue
        try:
            if match["kind"] == "old" and not os.path.lexists(target):
                os.rename(path, target)
            elif match["kind"] == "new":
                os.rmdir(path)  # empty while it is new; a folder holding anything is not ours
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
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EPERM):  # EPERM: a seccomp profile forbids it
        return False
    raise OSError(err, os.strerror(err), str(second))


def _replace_by_two_renames(staged: Path, target: Path) -> None:
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
    fd = os.open(target, _DIR_FLAGS) if target.is_dir() and not target.is_symlink() else None
    try:
        if fd is not None:  # locked aside: a sweeper leaves it alone while this writer lives
            _lock(fd, blocking=True)
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
        yield _lock(fd, blocking=True, shared=shared)
    finally:
        os.close(fd)
