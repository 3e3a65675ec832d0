"""Checkpoints that survive crashes, and say so when they are damaged.

A save writes everything into a hidden temporary directory, `manifest.json` last (the size and SHA-256 of every
other file), fsyncs it, and renames it to `step-NNNNNN` in one atomic step; only then are the `last` / `best`
pointers (symlinks) swapped, also atomically. A crash at any moment leaves either the old checkpoint or the new one,
never a half-written one behind a pointer; a save that fails (a full disk) removes its temporary directory and
names the last intact checkpoint.

Reading verifies (verify.py): `find` returns the newest checkpoint whose files match their manifest (a flipped bit,
a truncated or deleted file is caught) and describes each damaged one it skipped; a checkpoint of another layout
(`checkpoint_format` in trainer_state.json) is passed over with the reason.

A checkpoint holds the tensors training changes (`weights.safetensors`), the method's state (`method.pt`,
loaded with weights_only=True), and `trainer_state.json`: step, data position, best metric, RNG states.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ftkit.errors import UserError, first_line
from ftkit.quant.io import check_layout, quant_state
from ftkit.safe_files import (
    fsync,
    make_dir,
    open_file,
    read_bytes,
    remove,
    storage_error,
)
from ftkit.training.metrics import to_json
from ftkit.training.rundir import POINTERS, STEP
from ftkit.training.verify import (
    FORMAT,
    MANIFEST,
    METHOD_STATE,
    TRAINER_STATE,
    WEIGHTS,
    fingerprint,
    verify,
)

class DamagedCheckpoint(UserError):
    """A checkpoint whose files are not what was saved, or that cannot be read."""


class SaveFailed(UserError):
    """Writing a checkpoint failed (a full disk, a read-only filesystem); the previous checkpoints are intact."""


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoint_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What a checkpoint holds: every parameter that requires grad, and the codes and scales of quantized layers
    (with their format as metadata). Everything else is rebuilt from the recipe."""
    tensors, metadata = quant_state(model)
    tensors.update({name: p.detach() for name, p in model.named_parameters() if p.requires_grad})
    return {name: t.contiguous() for name, t in tensors.items()}, metadata


def rng_state() -> dict:
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state().tolist(),
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# --- saving --------------------------------------------------------------------------------------------------------

def save_checkpoint(root: Path, step: int, model, method, trainer_state: dict, keep_last: int,
                    is_best: bool = False, descriptions: dict[str, dict] | None = None) -> Path:
    """`descriptions` are extra JSON files written into the checkpoint (e.g. adapter_config.json)."""
    final = root / step_name(step)
    tmp = root / f".tmp-{step_name(step)}-{os.getpid()}"
    try:
        make_dir(root)
        remove(tmp)
        os.mkdir(tmp)
        _write_contents(tmp, model, method, trainer_state, descriptions or {})
        _publish(root, tmp, final)
        _point(root, "last", final)
        if is_best:
            _point(root, "best", final)
        prune(root, keep_last)
    except Exception as error:
        failure = storage_error(error)
        try:
            remove(tmp)
        except OSError:
            pass
        if failure is None:
            raise
        intact, _ = find(root)
        raise SaveFailed(f"cannot save checkpoint {final}: {failure.strerror or failure}; nothing half-written was "
                         f"kept, and the last intact checkpoint is {intact or 'none'}") from None
    return final


def _write_contents(tmp: Path, model, method, trainer_state: dict, descriptions: dict[str, dict]) -> None:
    tensors, metadata = checkpoint_tensors(model)
    save_file(tensors, str(tmp / WEIGHTS), metadata=metadata or None)
    with open_file(tmp / METHOD_STATE, "wb", exclusive=True) as handle:
        torch.save(method.state_dict(), handle)
    _write_json(tmp / TRAINER_STATE, {**trainer_state, "rng": rng_state(), "checkpoint_format": FORMAT})
    for filename, content in descriptions.items():
        _write_json(tmp / filename, content, indent=2)
    files = {name: fingerprint(tmp / name) for name in sorted(os.listdir(tmp))}
    _write_json(tmp / MANIFEST, {"files": files}, indent=1)  # last: a checkpoint without it is incomplete
    for name in os.listdir(tmp):
        fsync(tmp / name)
    fsync(tmp)


def _publish(root: Path, tmp: Path, final: Path) -> None:
    if os.path.lexists(final):  # the same step saved again (e.g. best, then last): replace it whole
        stale = root / f".stale-{final.name}-{os.getpid()}"
        remove(stale)
        os.rename(final, stale)
        os.rename(tmp, final)
        remove(stale)
    else:
        os.rename(tmp, final)
    fsync(root)


def _write_json(path: Path, data, indent: int | None = None) -> None:
    with open_file(path, "wb", exclusive=True) as handle:
        handle.write(to_json(data, indent).encode("utf-8"))


# --- finding and verifying -----------------------------------------------------------------------------------------

def find(root: Path, prefer: str = "last", need_method: bool = False) -> tuple[Path | None, list[str]]:
    """The checkpoint to use, and a line for each damaged one passed over on the way. `prefer` "best": the step
    `best` points to, when intact; then (and for "last") the newest intact step directory. `need_method`: method.pt
    must load too (a resume)."""
    skipped = []
    for candidate in _candidates(root, prefer):
        problem = verify(candidate, need_method)
        if problem is None:
            return candidate, skipped
        skipped.append(f"{candidate}: {problem}")
    return None, skipped


def resolve(root: Path, which: str = "last") -> Path | None:
    """The newest intact checkpoint (`which` "best": the best one when it is intact)."""
    return find(root, which)[0]


def step_dirs(root: Path) -> list[Path]:
    """Step directories, oldest first (links and other entries are not step directories)."""
    if not root.is_dir():
        return []
    return sorted(Path(entry.path) for entry in os.scandir(root)
                  if STEP.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False))


def pointer(root: Path, name: str) -> Path | None:
    """The step directory `last` or `best` names; None when absent or when it does not name one beside it."""
    link = root / name
    if not link.is_symlink():
        return None
    target = os.readlink(link)
    return root / target if STEP.fullmatch(target) else None


def _candidates(root: Path, prefer: str) -> list[Path]:
    newest_first = step_dirs(root)[::-1]
    preferred = pointer(root, prefer) if prefer == "best" else None
    if preferred is None or preferred not in newest_first:
        return newest_first
    return [preferred] + [p for p in newest_first if p != preferred]


# --- loading -------------------------------------------------------------------------------------------------------

def load_checkpoint(step_dir: Path, model, method=None) -> dict:
    """Restore the trained tensors into `model` (and the method's state); return trainer_state. A checkpoint that
    cannot be read ends in one line naming it."""
    try:
        with safe_open(str(step_dir / WEIGHTS), framework="pt") as handle:
            metadata = handle.metadata()
        weights = load_file(str(step_dir / WEIGHTS), device="cpu")  # copied onto the model's device below
        state = None
        if method is not None:
            # Read onto the CPU whatever device wrote it: optimizers move their state to their parameters' device.
            state = torch.load(step_dir / METHOD_STATE, weights_only=True, map_location="cpu")
    except Exception as err:  # missing, truncated, refused by the safe loader: not a checkpoint that loads
        raise DamagedCheckpoint(f"cannot load checkpoint {step_dir}: {first_line(err)}") from None
    try:
        check_layout(model, metadata, str(step_dir))
    except ValueError as err:
        raise UserError(f"{err}: the checkpoint is of another recipe") from None
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    missing = [name for name in weights if name not in targets]
    if missing:
        raise UserError(f"{step_dir}: checkpoint has tensors the model lacks, e.g. {missing[0]}: the checkpoint is "
                        f"of another recipe")
    with torch.no_grad():
        for name, tensor in weights.items():
            if targets[name].shape != tensor.shape:
                raise UserError(f"{step_dir}: {name} has shape {list(tensor.shape)} in the checkpoint and "
                                f"{list(targets[name].shape)} in the model: the checkpoint is of another recipe")
            targets[name].copy_(tensor)
    if method is not None:
        method.load_state_dict(state)
    return read_trainer_state(step_dir)


def read_trainer_state(step_dir: Path) -> dict:
    try:
        return json.loads(read_bytes(step_dir / TRAINER_STATE))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedCheckpoint(f"cannot read {step_dir / TRAINER_STATE}: {first_line(err)}") from None


# --- housekeeping --------------------------------------------------------------------------------------------------

def remove_leftovers(root: Path) -> None:
    """What saves that never finished left: temporary directories and pointers. A step saved again is moved aside
    (`.stale-`) before its replacement is renamed into place; stopped in between, the old one is put back."""
    if not root.is_dir():
        return
    for entry in os.scandir(root):
        path = Path(entry.path)
        if entry.name.startswith(".stale-") and entry.is_dir(follow_symlinks=False):
            step = STEP.search(entry.name)
            if step and not os.path.lexists(root / step.group()):
                os.rename(path, root / step.group())
                continue
        if entry.name.startswith((".tmp-", ".stale-", ".last-", ".best-")):
            remove(path)


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` step directories, plus whatever `best` and `last` point to."""
    pinned = {pointer(root, name) for name in POINTERS}
    steps = step_dirs(root)
    for path in steps[:-keep_last] if keep_last else steps:
        if path not in pinned:
            remove(path)


def _point(root: Path, name: str, target: Path) -> None:
    link = root / f".{name}-{os.getpid()}"
    remove(link)
    os.symlink(target.name, link)
    os.replace(link, root / name)
    fsync(root)

