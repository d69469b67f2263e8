"""Writing files and folders so that a crash, Ctrl-C or a full disk never leaves half of one behind.

Every tool of the series writes the same way: to a hidden temporary name beside the target
(``.NAME.tmp-PID``), then one rename. A reader sees the old file or the new one, never a mix. The
temporary names carry the process id, so the next run of a tool can tell the leftovers of a killed
run (its process is gone) from those of a run that is still going, and remove only the former.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)$")


def temporary_name(path: Path, kind: str = "tmp") -> Path:
    """``dir/.NAME.tmp-PID``: hidden, beside the target (same file system, so the rename is atomic)."""
    return path.parent / f".{path.name}.{kind}-{os.getpid()}"


def atomic_write(
    path: str | os.PathLike, write: Callable[[Path], object], before_replace: Callable[[], object] | None = None
) -> Path:
    """Call ``write(temporary path)``, push the bytes to the disk, then rename the result to ``path``.

    ``atomic_write(p, lambda tmp: tmp.write_text(text))``; the temporary file is removed when ``write``
    fails, so nothing half-written stays behind. The file is synced before the rename (and the folder
    after it): without that, a power cut shortly after can leave the new name pointing at an empty file.
    ``before_replace`` runs once the new file is complete and synced, right before the rename: what the
    new file replaces (an older run's checkpoints) is removed only when its replacement exists. An
    ``OSError`` names ``path`` (not the temporary name) as its ``filename``.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        sync_file(tmp)
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except OSError as err:
        if err.filename in (None, str(tmp)):
            err.filename = str(path)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    sync_folder(path.parent)
    return path


def sync_file(path: Path) -> None:
    """``fsync`` one file: its bytes are on the disk, not only in the operating system's cache."""
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows flushes only writable handles
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_folder(folder: Path) -> None:
    """``fsync`` a folder, so that a rename inside it is on the disk too (POSIX only; best effort)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder; the files themselves were synced
        pass
    finally:
        os.close(fd)


def sync_everything() -> None:
    """Flush every file system's cache to disk once (``sync``): cheaper than one ``fsync`` per file of a
    folder of thousands of images, before that folder is renamed into place."""
    if hasattr(os, "sync"):
        os.sync()


# errno values that mean "this write cannot succeed here": the user frees space, or picks another folder
DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


def free_space(path: str | os.PathLike) -> int:
    """Bytes free on the disk that holds ``path`` (or would hold it: the nearest existing folder above it)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def size_text(size: float) -> str:
    """``12.3 MB``: a size for a message (decimal units, as disk tools show them)."""
    if size < 1000:
        return f"{size:.0f} bytes"
    for unit in ("kB", "MB"):
        size /= 1000
        if size < 1000:
            return f"{size:.1f} {unit}"
    return f"{size / 1000:.1f} GB"


def write_problem(err: BaseException, where: str | os.PathLike | None = None) -> str | None:
    """A failed write as words (``no space left on the disk holding X``), or None when it is no such failure.

    A full disk, a read-only file system or a folder without write permission is the user's to fix;
    the callers add what to do then. Anything else is left to propagate as it is. For a copy the error
    names the source and then the target (``filename2``): the target is where the disk is full.
    ``where``: what to name instead of the file (the folder the user gave rather than its temporary twin).
    """
    if not isinstance(err, OSError) or err.errno not in DISK_FULL | _NOT_WRITABLE:
        return None
    where = where or err.filename2 or err.filename
    if err.errno in DISK_FULL:
        if where is None:
            return f"no space left on the disk ({err.strerror})"
        try:
            free = f", {size_text(free_space(where))} free"
        except OSError:
            free = ""
        return f"no space left on the disk holding {where} ({err.strerror}{free})"
    if err.errno == errno.EROFS:
        return f"{where or 'the folder'} is on a read-only file system"
    return f"no permission to write {where or 'there'} ({err.strerror})"


def swap_into_place(staging: Path, target: Path) -> None:
    """Rename a finished folder to ``target``; an older ``target`` is deleted only after the swap."""
    if not target.exists():
        staging.rename(target)
        return
    retired = temporary_name(target, "old")
    shutil.rmtree(retired, ignore_errors=True)
    target.rename(retired)
    try:
        staging.rename(target)
    except BaseException:
        retired.rename(target)
        raise
    shutil.rmtree(retired, ignore_errors=True)


@contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Build a folder in a hidden sibling and put it in place as ``target`` when the ``with`` block ends.

    On an error (or Ctrl-C) inside the block the sibling is deleted and ``target`` stays as it was.
    A check that must happen right before the swap (has someone else created ``target``?) goes at
    the end of the block.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent, target.name)
    staging = temporary_name(target)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        sync_everything()  # the files are on the disk before the folder takes the target's name
        swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


_waited_on: set[Path] = set()  # targets this process holds (an OS record lock cannot be taken twice by one process)
if hasattr(os, "register_at_fork"):  # a forked child holds none of its parent's locks
    os.register_at_fork(after_in_child=_waited_on.clear)


@contextmanager
def one_at_a_time(target: str | os.PathLike) -> Iterator[None]:
    """Let one process at a time build ``target``; the others wait here, then find it built.

    Two notebooks started at once on a fresh clone both want the synthetic set and its prepared tree;
    without this both would draw it, and the second swap would pull the folder from under the first
    one's readers. The lock is the OS's record lock on ``.NAME.lock`` beside the target (released when
    the process ends in any way). The file is removed on release; a waiter that then holds a lock on a
    removed file notices (another inode now has the name) and takes the lock again.
    """
    target = Path(target).absolute()
    if target in _waited_on:  # already ours (nested use in one process)
        yield
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    path = target.parent / f".{target.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        lock_file(fd, wait=True)
        try:
            if os.name == "nt" or os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder before us removed this file: lock the new one
    _waited_on.add(target)
    try:
        yield
    finally:
        _waited_on.discard(target)
        if os.name != "nt":
            path.unlink(missing_ok=True)  # before closing, so nobody else locks this file afterwards
        os.close(fd)


def lock_file(fd: int, wait: bool) -> None:
    """Take the OS's exclusive record lock on an open file (``lockf``; ``msvcrt.locking`` on Windows).

    ``wait=False`` raises ``OSError`` at once when another process holds it (a run folder in use);
    ``wait=True`` waits for it (a shared folder being built). The kernel releases it when the process ends.
    """
    try:
        import fcntl
    except ImportError:  # Windows: LK_LOCK itself gives up after 10 s, so keep asking
        import msvcrt

        while True:
            try:
                msvcrt.locking(fd, msvcrt.LK_LOCK if wait else msvcrt.LK_NBLCK, 1)
                return
            except OSError:
                if not wait:
                    raise
    fcntl.lockf(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)


def process_is_alive(pid: int) -> bool:
    """Whether a process with this id runs (on this machine). Unknown counts as alive: keep its files."""
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill would terminate the process there; never guess on Windows
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, it belongs to someone else
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete ``.NAME.tmp-PID`` / ``.NAME.old-PID`` files and folders whose process has ended.

    They are what a killed run left (a full checkpoint each, or a whole data folder). ``name``
    limits the clean-up to the temporaries of one target; those of running processes are kept.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = _TEMPORARY.match(path.name)
        if match is None or (name is not None and match["name"] != name):
            continue
        if process_is_alive(int(match["pid"])):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def replace_problem(
    target: Path, overwrite: bool, made_by_this_tool: bool, marker: str, tool: str = "this tool"
) -> str | None:
    """Why a tool may not (re)write ``target``, or None: only an empty folder or one it made is replaced.

    ``--overwrite`` must never delete a folder of the user's that happens to have the same name;
    a tool recognises its own folders by the marker file it writes into them.
    """
    if not target.exists() and not target.is_symlink():
        return None
    if not overwrite:
        return f"{target} already exists. Pass --overwrite or choose another folder."
    if not target.is_dir() or target.is_symlink():
        return f"{target} exists and is not a folder. Remove it or choose another folder."
    if not made_by_this_tool and any(target.iterdir()):
        return (
            f"{target} is not empty and was not made by {tool} (no {marker}); refusing to replace it. "
            f"Remove it yourself or choose another folder."
        )
    return None
