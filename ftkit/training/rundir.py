"""A run directory is one run's, and ftkit's alone.

- One writer: `claim` takes an exclusive lock (flock on `run.lock`, which records the holder's pid and host) that
  the run holds to its end; a second process is told who holds it. The kernel releases a flock when its process
  dies, so a lock that can be taken is free whatever the file says: a killed run's lock is taken over.
- ftkit's own: a run starts only in a new or empty directory, or in a run directory (marked by `run.json`); it
  never writes into a folder of the user's.
- No links: a symbolic link inside a run directory (in place of recipe.yaml, of a step directory, ...) is an error,
  never followed, written through or pruned. `checkpoints/last` and `best` are ftkit's own links and must name a
  step directory beside them. (The run directory itself may be a link: where the user keeps it is theirs.)

Torch-free: the lock and the checks run before anything heavy is loaded.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import time
from pathlib import Path

from ftkit.data import provenance
from ftkit.errors import UserError
from ftkit.recipe import Recipe, load_recipe
from ftkit.safe_files import (
    CLOEXEC,
    NOFOLLOW,
    link_error,
    read_bytes,
    remove,
    write_atomic,
)

LOCK = "run.lock"
MARKER = "run.json"
RECIPE = "recipe.yaml"
CHECKPOINTS = "checkpoints"
DATA_RECORD = provenance.RECORD  # where each split came from
INITIAL_HEAD = "initial_head.safetensors"  # a head initialised from the data, where training leaves it as it was
# Everything ftkit writes at the top of a run directory.
OWN = (RECIPE, "metrics.jsonl", "summary.json", "trace.ftz", CHECKPOINTS, "tensorboard", LOCK, MARKER, DATA_RECORD,
       INITIAL_HEAD)
FOLDERS = (CHECKPOINTS, "tensorboard")
STEP = re.compile(r"step-\d{6}")
POINTERS = ("last", "best")


class RunDirError(UserError):
    """A run directory that cannot be written or read as it is: in use, not ftkit's, holding a link."""


class RunLock:
    """This process's exclusive hold on a run directory, until `release` (or the process's end)."""

    def __init__(self, run_dir: Path, fd: int, previous: dict | None):
        self.run_dir, self.fd = run_dir, fd
        self.previous = previous  # what a holder that died without releasing the lock had recorded

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # a lock file left empty was released; one with a pid in it, abandoned
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock(run_dir: Path, elsewhere: str) -> RunLock:
    """Hold `run_dir` exclusively, or fail with one line naming the process that does; `elsewhere` says how to
    write somewhere else instead."""
    path = run_dir / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | NOFOLLOW | CLOEXEC, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise link_error(path) from None
        raise RunDirError(f"cannot create {path}: {err.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = _recorded(fd)
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunDirError(f"cannot lock {path}: {err.strerror}") from None
        raise RunDirError(f"{run_dir} is in use by {describe_holder(holder)}; one process writes a run directory "
                          f"at a time: wait for it to end, or {elsewhere}") from None
    previous = _recorded(fd)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    os.fsync(fd)
    return RunLock(run_dir, fd, previous)


def describe_holder(holder: dict | None) -> str:
    if not holder:
        return "another ftkit process (it has not recorded its pid yet)"
    return f"ftkit process {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})"


def _recorded(fd: int) -> dict | None:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def claim(run_dir: Path, source: str | None, elsewhere: str) -> RunLock:
    """Make `run_dir` this process's to write: created if new, refused if it holds files ftkit did not write or a
    link, locked, and marked as a run directory. `elsewhere` ends the line of a refusal: how to write elsewhere
    (e.g. "set train.output_dir to another directory")."""
    if os.path.lexists(run_dir):
        if not run_dir.is_dir():
            what = "a file, not a directory" if run_dir.is_file() else "not a directory"
            raise RunDirError(f"{run_dir} is {what}: {elsewhere}")
        refuse_foreign(run_dir, elsewhere)
    else:
        try:
            run_dir.mkdir(parents=True)
        except FileExistsError:  # another process created it meanwhile; the lock decides who goes on
            pass
        except OSError as err:
            raise RunDirError(f"cannot create {run_dir}: {err.strerror}: {elsewhere}") from None
    held = lock(run_dir, elsewhere)
    try:
        check_layout(run_dir)
        refuse_foreign(run_dir, elsewhere)  # again, now that no other ftkit process writes here
        for entry in os.scandir(run_dir):
            if entry.name.startswith(tuple(f".{name}.tmp-" for name in OWN)):  # an atomic write that never finished
                remove(Path(entry.path))
        if not os.path.lexists(run_dir / MARKER):
            write_atomic(run_dir / MARKER, json.dumps(
                {"ftkit": "run directory", "recipe": str(Path(source).resolve()) if source else None,
                 "created": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2) + "\n")
    except BaseException:
        held.release()
        raise
    return held


def is_run_dir(run_dir: Path) -> bool:
    return (run_dir / MARKER).is_file()


def refuse_foreign(run_dir: Path, elsewhere: str) -> None:
    entries = sorted(name for name in os.listdir(run_dir) if name != LOCK)
    if entries and not is_run_dir(run_dir) and {RECIPE, CHECKPOINTS} <= set(entries):
        raise RunDirError(f"{run_dir} is laid out as runs were before {MARKER} marked them, a layout this version "
                          f"does not continue: {elsewhere}")
    if entries and not is_run_dir(run_dir):
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise RunDirError(f"{run_dir} holds files ftkit did not write ({shown}); a run goes into a new or empty "
                          f"directory, or into a run directory of its own: {elsewhere}")


def check_layout(run_dir: Path) -> None:
    """Refuse a symbolic link where ftkit keeps its files (at the top of the run directory, among the checkpoints
    other than `last` / `best` naming a step directory beside them, inside step directories), and a directory where
    ftkit keeps a file or the other way round."""
    for name in OWN:
        path = run_dir / name
        if path.is_symlink():
            raise link_error(path)
        if os.path.lexists(path) and path.is_dir() != (name in FOLDERS):
            kind = "a directory" if path.is_dir() else "a file"
            raise RunDirError(f"{path} is {kind}, where ftkit keeps {'a directory' if name in FOLDERS else 'a file'}: "
                              f"move it out of the run directory")
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return
    for entry in os.scandir(root):
        path = Path(entry.path)
        if entry.is_symlink():
            if entry.name in POINTERS or entry.name.startswith((".last-", ".best-")):
                target = os.readlink(path)
                if STEP.fullmatch(target):
                    continue
                raise RunDirError(f"{path} points to {target}: ftkit's own links name a step directory beside them "
                                  f"(e.g. step-000100); remove it")
            raise link_error(path)
        if STEP.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
            for inner in os.scandir(path):
                if inner.is_symlink():
                    raise link_error(Path(inner.path))


def has_checkpoints(run_dir: Path) -> bool:
    root = run_dir / CHECKPOINTS
    return root.is_dir() and any(STEP.fullmatch(name) for name in os.listdir(root))


def read_marker(run_dir: Path) -> dict:
    try:
        data = json.loads(read_bytes(run_dir / MARKER))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_recipe(run_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """The recipe a run directory ran (its recipe.yaml, with `overrides`). Relative data paths are found as they
    were for the recipe file the run started from."""
    path = run_dir / RECIPE
    if path.is_symlink():
        raise link_error(path)
    if not path.is_file():
        raise RunDirError(f"{run_dir} is not a run directory (no {RECIPE}); give a run directory or a recipe file")
    recipe = load_recipe(path, overrides)
    started_from = read_marker(run_dir).get("recipe")
    recipe.source = started_from if isinstance(started_from, str) else str(path)
    return recipe


def recipe_to_train(target: Path, overrides: list[str]) -> Recipe:
    """What `ftkit train TARGET` trains: a recipe file with overrides, or a run directory's own recipe.yaml (the
    run continues in that directory, wherever it has been moved or copied)."""
    if "auto" in overrides:
        raise UserError("'auto' is not an override (key=value); did you mean --resume auto?")
    if not target.is_dir():
        return load_recipe(target, overrides)
    moved = [item for item in overrides if item.partition("=")[0].strip() == "train.output_dir"]
    if moved:
        raise UserError(f"override {moved[0]!r}: a run directory is trained where it is ({target}); copy it to "
                        f"move the run")
    recipe = read_recipe(target, overrides)
    recipe.train.output_dir = str(target)
    return recipe
