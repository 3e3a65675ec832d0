"""What a checkpoint holds, and whether it still holds what was saved.

`manifest.json`, written last, records the size and SHA-256 of every other file; `verify` compares them, then
checks what a loader relies on: a trainer state of this layout with a step (and, to resume, a data position and
random states), a weights file whose length is the one its own header describes, a method state the safe loader
accepts. A checkpoint of another layout is refused by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from pathlib import Path

import torch

from ftkit.errors import first_line
from ftkit.safe_files import read_bytes

WEIGHTS = "weights.safetensors"
METHOD_STATE = "method.pt"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
FORMAT = 2  # trainer_state.json's checkpoint_format: the layout this version writes and reads


def fingerprint(path: Path) -> dict:
    digest, size = hashlib.sha256(), 0
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def verify(step_dir: Path, need_method: bool = False) -> str | None:
    """None when `step_dir` holds what was saved there, else what is wrong with it."""
    try:
        info = os.lstat(step_dir)
    except FileNotFoundError:
        return "it does not exist"
    if not stat.S_ISDIR(info.st_mode):
        return "not a directory"
    if not os.path.lexists(step_dir / MANIFEST):
        return _older_layout(step_dir) or f"{MANIFEST} is missing (the save did not finish, or it was deleted)"
    problem = _check_manifest(step_dir)
    if problem is not None:
        return problem
    try:
        state = json.loads(read_bytes(step_dir / TRAINER_STATE))
    except FileNotFoundError:
        return f"{TRAINER_STATE} is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{TRAINER_STATE} is unreadable ({first_line(err)})"
    if not isinstance(state, dict) or not isinstance(state.get("loop"), dict) or not isinstance(
            state["loop"].get("step"), int):
        return f"{TRAINER_STATE} does not hold a trainer state"
    if state.get("checkpoint_format") != FORMAT:
        return _layout_refused(state.get("checkpoint_format"))
    if need_method and not all(isinstance(state.get(key), dict) for key in ("stream", "rng")):
        return (f"{TRAINER_STATE} holds no data position or random state to resume from"
                + (" (ftkit replay rebuilds weights only)" if "replayed_from" in state else ""))
    problem = _check_safetensors(step_dir / WEIGHTS)
    if problem is None and need_method:
        problem = _check_method_state(step_dir / METHOD_STATE)
    return problem


def _check_manifest(step_dir: Path) -> str | None:
    """Every file the manifest lists has the size and SHA-256 it was saved with."""
    try:
        manifest = json.loads(read_bytes(step_dir / MANIFEST))
    except FileNotFoundError:
        return f"{MANIFEST} is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{MANIFEST} is unreadable ({first_line(err)})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or WEIGHTS not in files or TRAINER_STATE not in files:
        return f"{MANIFEST} does not list the checkpoint's files"
    for name, expected in files.items():
        problem = _check_file(step_dir, name, expected)
        if problem:
            return problem
    return None


def _older_layout(step_dir: Path) -> str | None:
    """Why a checkpoint without a manifest is refused, when its trainer state is of an earlier layout (which wrote
    none, and named none or layout 1)."""
    try:
        state = json.loads(read_bytes(step_dir / TRAINER_STATE))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(state, dict) and isinstance(state.get("loop"), dict) and state.get("checkpoint_format") != FORMAT:
        return _layout_refused(state.get("checkpoint_format"))
    return None


def _layout_refused(layout) -> str:
    return (f"written in checkpoint layout {layout if layout is not None else 1}, which this version does not read "
            f"(it reads layout {FORMAT})")


def _check_file(step_dir: Path, name: str, expected) -> str | None:
    if not isinstance(expected, dict) or "/" in name or name in (".", "..", MANIFEST):
        return f"{MANIFEST} is malformed at {name!r}"
    path = step_dir / name
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return f"{name} is missing"
    if not stat.S_ISREG(info.st_mode):
        return f"{name} is not a regular file"
    saved = expected.get("bytes")
    if info.st_size != saved:
        return f"{name} has {info.st_size:,} bytes where {saved:,} were saved" if isinstance(saved, int) else \
            f"{MANIFEST} is malformed at {name!r}"
    if fingerprint(path)["sha256"] != expected.get("sha256"):
        return f"{name} is not what was saved (its SHA-256 differs from the manifest's)"
    return None


def _check_safetensors(path: Path) -> str | None:
    """The file's length must be what its header says: 8 bytes of header length, the JSON header, the tensors."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return f"{WEIGHTS} is missing"
    except OSError as err:
        return f"{WEIGHTS} is unreadable ({err.strerror})"
    with os.fdopen(fd, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        head = handle.read(8)
        if len(head) < 8:
            return f"{WEIGHTS} is truncated ({size} bytes)"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return f"{WEIGHTS} is truncated or damaged (its header claims {length:,} of its {size:,} bytes)"
        try:
            header = json.loads(handle.read(length))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return f"{WEIGHTS} has a damaged header"
    if size != 8 + length + end:
        return f"{WEIGHTS} is truncated or damaged ({size:,} bytes where its header describes {8 + length + end:,})"
    return None


def _check_method_state(path: Path) -> str | None:
    if not os.path.isfile(path) or os.path.islink(path):
        return f"{METHOD_STATE} is missing"
    try:
        torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except Exception as err:  # a refused pickle, a damaged zip: either way not loadable
        return f"{METHOD_STATE} cannot be loaded safely ({first_line(err)})"
    return None

