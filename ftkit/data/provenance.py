"""Where a run's data came from: the record a run directory keeps (data.json) so that `ftkit eval RUN` and
`ftkit train RUN --resume` read the same data from any working directory and any environment.

A file is recorded by its resolved path, size and SHA-256; a hub split by dataset, config and split, with the
fingerprint `datasets` gives it. Read back, a file is used when it still has its recorded size and digest: at its
recorded path, else where the task's ordinary lookup finds an identical copy (a data directory that moved). A file
that changed or vanished stops the command with one line naming it and what to do.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ftkit.errors import DataError

RECORD = "data.json"
CHUNK = 1 << 20


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path) -> dict:
    """A file as a record holds it: resolved path, size and SHA-256."""
    path = Path(path).resolve()
    return {"path": str(path), "size": path.stat().st_size, "sha256": sha256(path)}


def file_origin(path: Path, key: str) -> dict:
    """A file as read (its digest is taken when the record is written)."""
    return {"key": key, "path": str(Path(path).resolve())}


def record(task_name: str, origins: dict[str, dict]) -> dict:
    """data.json's content: each split's origin, files with their size and SHA-256."""
    splits = {}
    for split, origin in origins.items():
        entry = dict(origin)
        if "path" in entry:
            path = Path(entry["path"])
            entry.update(size=path.stat().st_size, sha256=sha256(path))
        splits[split] = entry
    return {"task": task_name, "splits": splits}


def read_record(run_dir: Path, task_name: str, overridden: set[str]) -> dict | None:
    """The run's recorded origins by split, or None for a run directory without a record (or one of another task):
    the ordinary lookup then applies. A split whose recipe key is in `overridden` (given on the command line) maps
    to None: its ordinary lookup applies."""
    path = Path(run_dir) / RECORD
    if not path.is_file() or path.is_symlink():
        return None
    try:
        data = json.loads(path.read_text())
        splits = data["splits"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{path} is not readable as a data record; remove it to look the data up as before it "
                        f"existed (FTKIT_DATA_DIR, data.*_file)") from None
    if data.get("task") != task_name:
        return None
    return {split: (None if entry.get("key") in overridden else entry) for split, entry in splits.items()}


def intact_file(entry: dict, candidates: list[Path], task: str, split: str, remedy: str) -> Path:
    """The recorded file when it still has its size and digest, else the first of `candidates` (the ordinary
    lookup's files) that has them; otherwise one line saying which file changed or vanished, and `remedy`."""
    recorded = Path(entry["path"])
    for path in [recorded, *candidates]:
        if path.is_file() and path.stat().st_size == entry["size"] and sha256(path) == entry["sha256"]:
            return path
    if recorded.is_file():
        size = recorded.stat().st_size
        change = f"size {entry['size']:,} -> {size:,} bytes" if size != entry["size"] else "its SHA-256 differs"
        what = f"has changed since the run read it ({change})"
    else:
        what = "is gone"
    raise DataError(f"{task} {split} data: {recorded}, recorded in the run's {RECORD}, {what}; {remedy}")


def check_hub(entry: dict, fingerprint: str | None, task: str, split: str) -> None:
    """A hub split read again must be the one the run read, where `datasets` tells (its fingerprint)."""
    recorded = entry.get("fingerprint")
    if recorded and fingerprint and recorded != fingerprint:
        raise DataError(f"{task} {split} data: the hub's {entry['hub']}/{entry.get('name')} {entry['split']} has "
                        f"changed since the run read it (fingerprint {recorded} -> {fingerprint}); give the file to "
                        f"use with {entry['key']}=PATH")
