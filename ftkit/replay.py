"""`ftkit replay RECIPE TRACE -o DIR`: rebuild a zeroth-order run's weights from the base model and its trace,
without a forward pass, bit-identical to the trained ones. DIR becomes a run directory with one checkpoint, so
`ftkit eval DIR` and `ftkit export DIR` work on it."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import torch
import yaml

from ftkit.devices import deterministic, resolve_device
from ftkit.errors import UserError
from ftkit.optim.trace import decode_tensor, read_trace
from ftkit.recipe import Recipe, recipe_to_dict
from ftkit.recipe.compare import computing_differences
from ftkit.safe_files import write_atomic
from ftkit.training import checkpoint as ckpt
from ftkit.training import rundir
from ftkit.training.environment import check_environment, using_threads
from ftkit.training.setup import build_method, build_run


def replay(recipe: Recipe, trace_path: Path, out_dir: Path, allow_inexact: bool = False) -> dict:
    """Rebuild the run on the device `train.device` names. Replays are bit-identical in the environment the trace
    was written in (device kind and model, torch version); elsewhere they are refused unless `allow_inexact`."""
    device = resolve_device(recipe.train.device)
    with using_threads(recipe.train.threads), deterministic(device):
        return _replay(recipe, trace_path, out_dir, device, allow_inexact)


def _replay(recipe: Recipe, trace_path: Path, out_dir: Path, device, allow_inexact: bool) -> dict:
    started = time.perf_counter()
    try:
        header, records = read_trace(trace_path)
        initial = {name: decode_tensor(entry) for name, entry in header["initial_tensors"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, struct.error,
            json.JSONDecodeError) as err:
        raise UserError(f"cannot read trace {trace_path}: {err}") from None
    _check_recipe(recipe, header["recipe"], trace_path)
    # The update arithmetic is elementwise, so a CPU replay does not depend on the thread count.
    check_environment(header["environment"], f"cannot replay {trace_path} bit-exactly", allow_inexact, device,
                      ignore=("threads",))
    held = rundir.claim(out_dir, recipe.source, "choose another -o directory")  # replays write one at a time
    try:
        if rundir.has_checkpoints(out_dir):
            raise UserError(f"{out_dir} already holds checkpoints; choose a new directory")
        return _rebuild(recipe, header, records, initial, trace_path, out_dir, device, started)
    finally:
        held.release()


def _rebuild(recipe: Recipe, header: dict, records: list, initial: dict, trace_path: Path, out_dir: Path, device,
             started: float) -> dict:
    run = build_run(recipe, device, num_classes=header["num_classes"])  # the data-free model, as training began
    params = dict(run.model.named_parameters())
    with torch.no_grad():
        for name, tensor in initial.items():
            if name not in params or params[name].shape != tensor.shape:
                raise UserError(f"cannot replay {trace_path}: its initial tensor {name} does not fit this recipe's "
                                f"model")
            params[name].copy_(tensor)
    method = build_method(run)  # after the initial tensors are in place, as in training
    for record in records:
        method.replay_step(record["seed"], record["lr"], record["gradients"])
    steps = records[-1]["step"] if records else 0
    write_atomic(out_dir / rundir.RECIPE, yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    state = {"loop": {"step": steps, "best_metric": None, "best_step": None, "dev_at_start": None},
             "replayed_from": str(trace_path), "recipe_source": recipe.source}
    step_dir = ckpt.save_checkpoint(out_dir / "checkpoints", steps, run.model, method, state, keep_last=1)
    return {"steps": steps, "checkpoint": str(step_dir), "trace_bytes": Path(trace_path).stat().st_size,
            "seconds": time.perf_counter() - started}


def _check_recipe(recipe: Recipe, traced: dict, trace_path: Path) -> None:
    differences = computing_differences(traced, recipe_to_dict(recipe))
    if differences:
        key, before, now = differences[0]
        raise UserError(f"the trace {trace_path} was written by a different recipe: {key} was {before!r} and is now "
                        f"{now!r}")
