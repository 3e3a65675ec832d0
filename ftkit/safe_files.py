"""Writing files without following symbolic links, atomically where a reader may look, and naming the storage
failure (a full disk) behind whatever error a library reports it with.

Every file ftkit writes into a run directory is created here: O_NOFOLLOW means a link planted in place of a
file ftkit writes makes the write fail instead of replacing the file the link points to. Torch-free.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
from pathlib import Path

from ftkit.errors import UserError

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class LinkFound(UserError):
    """A symbolic link where ftkit writes or reads its own files."""


def link_error(path: Path) -> LinkFound:
    return LinkFound(f"{path} is a symbolic link; ftkit never reads or writes its own files through a link: "
                     f"remove it (or replace it by the file it points to)")


def open_file(path: Path, mode: str = "wb", exclusive: bool = False):
    """Open `path` for writing ('wb': truncated, 'ab': appended, 'r+b': in place) without following a link there;
    with `exclusive`, fail if anything is already there."""
    flags = {"wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
             "r+b": os.O_RDWR}[mode]
    if exclusive:
        flags = (flags | os.O_CREAT | os.O_EXCL) & ~os.O_TRUNC
    try:
        fd = os.open(path, flags | NOFOLLOW | CLOEXEC, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP or (err.errno == errno.EEXIST and Path(path).is_symlink()):
            raise link_error(path) from None
        raise
    return os.fdopen(fd, mode)


def read_bytes(path: Path) -> bytes:
    """A file's bytes, refusing a link in its place."""
    try:
        fd = os.open(path, os.O_RDONLY | NOFOLLOW | CLOEXEC)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise link_error(path) from None
        raise
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def write_atomic(path: Path, data: bytes | str) -> None:
    """Replace `path` by `data` in one step: readers see the old content or the new one, never a part; a link at
    `path` is replaced itself, never written through."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    remove(tmp)
    try:
        with open_file(tmp, "wb", exclusive=True) as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise
    fsync(path.parent)


def make_dir(path: Path) -> None:
    """Create `path` (and its parents) unless it is a directory already; a link in its place is an error."""
    path = Path(path)
    try:
        path.mkdir(parents=True)
    except FileExistsError:
        pass
    check_dir(path)


def check_dir(path: Path) -> None:
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise link_error(path)
    if not stat.S_ISDIR(info.st_mode):
        raise UserError(f"{path} is a file, not a directory")


def remove(path: Path) -> None:
    """Remove a file, a link (not what it points to) or a directory tree (whose links are removed, not followed)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def fsync(path: Path) -> None:
    """Flush a file or a directory (its entries: a rename into it) to storage. Reading nothing, it may follow a link:
    the run directory itself may be one."""
    fd = os.open(path, os.O_RDONLY | CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def storage_error(error: BaseException) -> OSError | None:
    """The OSError behind `error` when writing failed for a reason of the storage (full, over quota, read-only,
    I/O), else None. Libraries report it their own way: torch.save as a RuntimeError whose context is the OSError,
    safetensors as "I/O error: ... (os error 28)"."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError):
            return error
        found = re.search(r"os error (\d+)", str(error))
        if found:
            number = int(found.group(1))
            return OSError(number, os.strerror(number))
        error = error.__cause__ or error.__context__
    return None
