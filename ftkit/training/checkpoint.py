"""Checkpoints that survive crashes.

A save writes everything into a hidden temporary directory, fsyncs it, and renames it to `step-NNNNNN` in one
atomic step; only then are the `last` / `best` pointers (symlinks) swapped, also atomically. A crash at any
moment leaves either the old checkpoint or the new one, never a half-written one behind a pointer.

A checkpoint holds the tensors training changes (`weights.safetensors`), the method's state (`method.pt`,
loaded with weights_only=True), and `trainer_state.json`: step, data position, best metric, RNG states.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ftkit.quant.io import check_layout, quant_state

WEIGHTS = "weights.safetensors"
METHOD_STATE = "method.pt"
TRAINER_STATE = "trainer_state.json"


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


def save_checkpoint(root: Path, step: int, model, method, trainer_state: dict, keep_last: int,
                    is_best: bool = False, descriptions: dict[str, dict] | None = None) -> Path:
    """`descriptions` are extra JSON files written into the checkpoint (e.g. adapter_config.json)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    tmp = root / f".tmp-{step_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors, metadata = checkpoint_tensors(model)
    save_file(tensors, str(tmp / WEIGHTS), metadata=metadata or None)
    torch.save(method.state_dict(), tmp / METHOD_STATE)
    (tmp / TRAINER_STATE).write_text(json.dumps({**trainer_state, "rng": rng_state()}))
    for filename, content in (descriptions or {}).items():
        (tmp / filename).write_text(json.dumps(content, indent=2))
    for path in tmp.iterdir():
        _fsync(path)
    _fsync(tmp)
    if final.exists():  # the same step saved again (e.g. best, then last): replace it whole
        stale = root / f".stale-{step_name(step)}-{os.getpid()}"
        os.rename(final, stale)
        os.rename(tmp, final)
        shutil.rmtree(stale)
    else:
        os.rename(tmp, final)
    _fsync(root)
    _point(root, "last", final)
    if is_best:
        _point(root, "best", final)
    prune(root, keep_last)
    return final


def load_checkpoint(step_dir: Path, model, method=None) -> dict:
    """Restore the trained tensors into `model` (and the method's state); return trainer_state."""
    with safe_open(str(step_dir / WEIGHTS), framework="pt") as handle:
        check_layout(model, handle.metadata(), str(step_dir))
    weights = load_file(str(step_dir / WEIGHTS), device="cpu")  # copied onto the model's device below
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    missing = [name for name in weights if name not in targets]
    if missing:
        raise ValueError(f"{step_dir}: checkpoint has tensors the model lacks, e.g. {missing[0]}")
    with torch.no_grad():
        for name, tensor in weights.items():
            targets[name].copy_(tensor)
    if method is not None:
        # Read onto the CPU whatever device wrote it: optimizers move their state to their parameters' device.
        method.load_state_dict(torch.load(step_dir / METHOD_STATE, weights_only=True, map_location="cpu"))
    return read_trainer_state(step_dir)


def read_trainer_state(step_dir: Path) -> dict:
    return json.loads((step_dir / TRAINER_STATE).read_text())


def resolve(root: Path, which: str = "last") -> Path | None:
    """The step directory a pointer names; without a pointer, the newest complete step directory."""
    pointer = root / which
    if pointer.is_symlink() and pointer.resolve().is_dir():
        return pointer.resolve()
    if which == "best":
        return None
    steps = sorted(p for p in root.glob("step-*") if (p / TRAINER_STATE).is_file()) if root.is_dir() else []
    return steps[-1] if steps else None


def best_or_last(root: Path) -> Path | None:
    """The checkpoint a finished run is judged by: the best dev metric's, else the last one."""
    return resolve(root, "best") or resolve(root, "last")


def remove_leftovers(root: Path) -> None:
    """Temporary directories of saves that never finished."""
    if root.is_dir():
        for path in root.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)
        for path in root.glob(".stale-*"):
            shutil.rmtree(path, ignore_errors=True)


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` step directories, plus whatever `best` and `last` point to."""
    pinned = {p.resolve() for p in (root / "best", root / "last") if p.is_symlink()}
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for path in steps[:-keep_last] if keep_last else steps:
        if path.resolve() not in pinned:
            shutil.rmtree(path)


def _point(root: Path, name: str, target: Path) -> None:
    link = root / f".{name}-{os.getpid()}"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(target.name, link)
    os.replace(link, root / name)
    _fsync(root)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
