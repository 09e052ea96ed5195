"""Atomic writing: every cache, state, edit file, result, model folder and checkpoint of the project is written
through here, the one write-beside-and-swap path.

* A file is first written to a temporary file in the same folder, then moved over the target with ``os.replace``
  (atomic on POSIX), so a reader never sees half a file and a failure leaves the old file intact
  (:func:`atomic_path`, :func:`write_text`).
* A folder is written into a new folder beside the target, then swapped in (:func:`atomic_folder`): the old folder
  is renamed aside, the new one renamed into place, the old one removed. An exception between the two renames puts
  the old folder back.

Every temporary name carries the writing process's id (``.NAME.new-PID-xxxx``, ``.NAME.old-PID-xxxx``,
``.NAME.tmp-PID-xxxx``, ``.NAME.del-PID-xxxx`` for a folder being removed, :func:`remove_folder`). What a killed process left beside a target is cleared by the next write to that target
(:func:`clean_stale`): a new folder or file is removed, and an old folder is put back when the target is missing
(a kill between the swap's two renames), else removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Union

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<tag>new|old|tmp|del)-(?P<pid>\d+)-[^/]*$")
_LEGACY_OLD = re.compile(r"^\.(?P<name>.+)\.(?P<tag>old)(?:-(?P<pid>\d+))?$")  # earlier versions' swap names


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_prefix(target: Path, tag: str) -> str:
    """The prefix of a temporary name beside ``target``: ``.NAME.<tag>-<pid>-``."""
    return f".{target.name}.{tag}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale(target: PathLike) -> list[Path]:
    """Clear what a killed writer left beside ``target`` (see the module docstring); returns the paths handled.

    Only names of the form this module writes, from processes that are no longer running, are touched; an old
    folder is put back at ``target`` when ``target`` is missing (it is what the user had)."""
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return []
    handled = []
    leftovers = []
    for entry in parent.iterdir():
        match = _STALE.match(entry.name) or _LEGACY_OLD.match(entry.name)
        if match and match["name"] == target.name and not _alive(int(match["pid"] or 0)):
            leftovers.append((match["tag"], entry))
    for tag, entry in sorted(leftovers, key=lambda t: t[0] != "old"):  # an old folder first: it may go back
        if tag == "old" and not target.exists() and not target.is_symlink():
            os.replace(entry, target)
            logger.warning("%s: put back from %s (an earlier run was stopped while swapping it)", target, entry.name)
        else:
            _remove(entry)
            logger.info("removed %s (left by an earlier run that was stopped)", entry)
        handled.append(entry)
    return handled


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path beside ``path``; when the block succeeds it replaces ``path`` (with the
    permissions of a newly created file), when it raises the temporary file is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=temp_prefix(target, "tmp"), suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and durably (fsync before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def normal_permissions(root: Path) -> None:
    """Directories ``0777 & ~umask``, files ``0666 & ~umask`` under ``root`` (``mkdtemp`` makes 0700)."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o777 & ~mask)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~mask)


def swap_in(new: Path, target: Path) -> None:
    """Put the complete folder ``new`` at ``target``; the old ``target`` is removed only once ``new`` is there
    (an exception between the two renames puts the old folder back)."""
    if not target.exists():
        os.replace(new, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=temp_prefix(target, "old"), dir=target.parent))
    os.rmdir(aside)
    os.replace(target, aside)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside, target)
        raise
    _rmtree(aside)


def _rmtree(path: Path) -> None:
    """Remove a folder this module set aside; a Ctrl-C while it goes lets it finish first (no half folder)."""
    try:
        shutil.rmtree(path, ignore_errors=True)
    except KeyboardInterrupt:
        shutil.rmtree(path, ignore_errors=True)
        raise


def remove_folder(path: PathLike) -> None:
    """Remove a folder this project wrote: renamed aside first (``.NAME.del-PID-xxxx``, one atomic step), then
    deleted, so that ``path`` is either whole or gone; what a kill leaves aside goes at the next write."""
    path = Path(path)
    if not path.exists():
        return
    aside = Path(tempfile.mkdtemp(prefix=temp_prefix(path, "del"), dir=path.parent))
    os.rmdir(aside)
    os.replace(path, aside)
    _rmtree(aside)


@contextlib.contextmanager
def atomic_folder(target: PathLike) -> Iterator[Path]:
    """Yield a new, empty folder beside ``target``; when the block succeeds the folder gets normal permissions and
    is swapped in at ``target`` (:func:`swap_in`); when it raises, the new folder is removed and ``target`` is as
    it was."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target, "new"), dir=target.parent))
    try:
        yield tmp
        normal_permissions(tmp)
        swap_in(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
