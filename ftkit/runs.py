"""Reading run directories: the recipe a run used, its checkpoints, and evaluating them."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Callable

from omegaconf import OmegaConf

from ftkit.errors import UserError
from ftkit.recipe import Recipe, load_recipe, recipe_from_dict, recipe_to_dict
from ftkit.recipe.load import check_recipe
from ftkit.safe_files import remove, storage_error
from ftkit.training import checkpoint as ckpt
from ftkit.training import rundir


# Overrides that name a data file: on a finished run they say where to read a split, in place of its data record.
DATA_PATH_KEY = re.compile(r"data\.(train|dev|test)_file|data\.tasks\.[^.=]+\.(train|dev|test)")


def load_run_recipe(run_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """The recipe of a run directory (with `overrides`), after checking that nothing in it is a link."""
    rundir.check_layout(run_dir)
    return rundir.read_recipe(run_dir, overrides)


def recorded_data(run_dir: Path, recipe: Recipe, overrides: list[str] | tuple[str, ...] = ()) -> dict | None:
    """The run's data record (ftkit.data.provenance), less the splits whose file `overrides` name."""
    from ftkit.data import provenance

    given = {item.partition("=")[0].strip() for item in overrides}
    return provenance.read_record(run_dir, recipe.data.task, given)


def checkpoint_to_use(run_dir: Path, checkpoint: Path | None = None, warn: Callable[[str], None] = print) -> Path:
    """`checkpoint` when given and intact; else the run's best checkpoint when intact, else its newest intact one.
    Each damaged checkpoint passed over is told to `warn`, in one line."""
    if checkpoint is not None:
        problem = ckpt.verify(Path(checkpoint))
        if problem is not None:
            raise ckpt.DamagedCheckpoint(f"--checkpoint {checkpoint} is not usable: {problem}")
        return Path(checkpoint)
    found, skipped = ckpt.find(run_dir / rundir.CHECKPOINTS, "best")
    if found is None:
        if skipped:
            raise ckpt.DamagedCheckpoint(f"{run_dir} has no intact checkpoint: all {len(skipped)} are damaged (the "
                                         f"first tried, {skipped[0]})")
        raise UserError(f"{run_dir} has no checkpoint yet")
    for line in skipped:
        warn(f"warning: skipping damaged checkpoint {line}")
    return found


def evaluate_target(target: Path, split: str, checkpoint: Path | None = None, overrides: list[str] = (),
                    device: str = "auto", warn: Callable[[str], None] = print, progress=None) -> dict:
    """Evaluate a run directory (its best checkpoint, else last, or `checkpoint`) or a recipe's untrained model.

    For a run directory, `quant.*` overrides quantize the trained model after loading it (post-training
    quantization), e.g. quant.format=int4 quant.group_size=128. `device` is where to evaluate (auto: a GPU when one
    is visible), whatever device the run trained on: checkpoints are read onto the CPU and copied there. A damaged
    checkpoint is passed over for the newest intact one, with a line to `warn`. `progress` follows the batches
    (ftkit.eval.evaluate).
    """
    from ftkit.data.dataset import load_task_data
    from ftkit.devices import deterministic, resolve_device
    from ftkit.training.environment import using_threads
    from ftkit.training.setup import build_run

    if split not in ("dev", "test"):
        raise UserError(f"--split must be dev or test, got {split!r}")
    ptq, recorded = None, None
    if target.is_dir():
        data_paths = [item for item in overrides if DATA_PATH_KEY.fullmatch(item.partition("=")[0].strip())]
        recipe = load_run_recipe(target, data_paths)
        recorded = recorded_data(target, recipe, data_paths)
        rest = [item for item in overrides if item not in data_paths]
        if rest:
            ptq = _ptq_spec(recipe, rest)
        step_dir = checkpoint_to_use(target, checkpoint, warn)
    elif target.is_file():
        recipe, step_dir = load_recipe(target, overrides), None
        if checkpoint is not None:
            raise UserError("--checkpoint applies to a run directory, not to a recipe")
    else:
        raise UserError(f"not found: {target} (give a run directory or a recipe file)")

    task = load_task_data(recipe, splits=("train", split), recorded=recorded)
    if split not in task.splits:
        raise UserError(f"task {task.name} has no {split} split here (found: {', '.join(task.splits)})")
    placed = resolve_device(device)
    with using_threads(recipe.train.threads), deterministic(placed):  # as fast as the run trained
        run = build_run(recipe, placed, task=task)
        return _evaluate(run, split, step_dir, ptq, target, progress)


def _evaluate(run, split: str, step_dir: Path | None, ptq, target: Path, progress=None) -> dict:
    """The run's model with `step_dir`'s weights (else untrained), quantized by `ptq` when given, on `split`."""
    if step_dir is not None:
        ckpt.load_checkpoint(Path(step_dir), run.model)
    if ptq is not None:
        from ftkit.quant.convert import quantize_model

        run.model = quantize_model(run.model, ptq)
    metrics = run.evaluate(split, progress=progress)
    source = str(Path(step_dir).resolve()) if step_dir is not None else f"{target} (untrained)"
    if ptq is not None:
        source += f" + {ptq.format} post-training quantization"
    return {"task": run.task.name, "kind": run.task.spec.kind, "split": split, "source": source, **metrics}


def _ptq_spec(recipe: Recipe, overrides: list[str]):
    """The quant section after applying `overrides`, which may only touch quant.* for a finished run."""
    for item in overrides:
        if not item.startswith("quant."):
            raise UserError(f"override {item!r}: a finished run can only be re-evaluated under quant.* overrides "
                            f"(post-training quantization) and data file paths (data.dev_file=PATH, ...)")
    from ftkit.quant import FORMATS

    if FORMATS[recipe.quant.format].low_bit:
        raise UserError("post-training quantization applies to a run trained in full precision "
                        f"(this one used quant.format {recipe.quant.format})")
    merged = OmegaConf.merge(OmegaConf.create(recipe_to_dict(recipe)), OmegaConf.from_dotlist(list(overrides)))
    updated = recipe_from_dict(OmegaConf.to_container(merged), "overrides",
                               {item.partition("=")[0]: item for item in overrides})
    check_recipe(updated, "overrides")
    return updated.quant


def export_run(run_dir: Path, out_dir: Path, checkpoint: Path | None = None, merge: bool = False,
               warn: Callable[[str], None] = print) -> Path:
    """Write the run's model as a plain Hugging Face directory: weights (dequantized when quantized), config,
    tokenizer. With `merge`, LoRETTA_rep / LoRA updates are merged into the weights; otherwise adapters are written
    beside the model in `ftkit_adapter.safetensors`. An encoder's task head (and TT hidden layer) goes in
    `ftkit_head.safetensors`, described by `ftkit_task.json`.

    The directory is written beside `out_dir` under a temporary name and renamed into place whole, so an export
    that fails (a full disk) leaves nothing, and of two exports to the same place one wins and the other says so."""
    from ftkit.adapters import ADAPTERS

    recipe = load_run_recipe(run_dir)
    adapter = ADAPTERS[recipe.method.adapter]
    if merge and adapter.trains_base:
        warn(f"note: {run_dir} has no adapter (method.adapter {adapter.name}); its weights are exported as they are")
        merge = False
    if merge and not adapter.mergeable:
        raise UserError(f"{adapter.name} adapters cannot be merged into the base weights (they are not a weight "
                        f"update); export without --merge to keep them as their own tensors")
    step_dir = checkpoint_to_use(run_dir, checkpoint, warn)
    _check_export_target(out_dir)
    run = _run_without_data(recipe, run_dir)
    ckpt.load_checkpoint(Path(step_dir), run.model)
    adapters = adapter.unwrap(run.model.backbone, merge) if adapter.unwrap is not None else {}
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    try:
        remove(staging)
        staging.mkdir(parents=True)
        _write_export(staging, run, adapters, step_dir, merge)
        os.rename(staging, out_dir)  # onto nothing or an empty directory; fails if another export got there first
    except Exception as error:
        remove(staging)
        failure = storage_error(error)
        if failure is None:
            raise
        if failure.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise UserError(f"{out_dir} was written by another process meanwhile; choose another -o") from None
        raise UserError(f"cannot write {out_dir}: {failure.strerror or failure}; nothing was left behind") from None
    return out_dir


def export_gguf_run(run_dir: Path, out_file: Path, checkpoint: Path | None = None, merge: bool = False,
                    warn: Callable[[str], None] = print) -> Path:
    """Write the run's model as one GGUF file shaped after the file its model was read from (ftkit.gguf.write):
    the trained codes in their block formats as they are, float tensors in the source's types, the metadata
    carried over. A run this cannot hold exactly is refused before anything is loaded or written."""
    from ftkit.adapters import ADAPTERS
    from ftkit.gguf.source import gguf_file
    from ftkit.gguf.write import refusal, write_gguf

    recipe = load_run_recipe(run_dir)
    recorded = _recorded_model_file(run_dir)
    source = Path(recorded["path"]) if recorded else gguf_file(recipe.model.name)
    why = refusal(recipe, source, merge)
    if why is not None:
        raise UserError(f"{run_dir} cannot be exported as GGUF: {why}")
    if out_file.exists() or out_file.is_symlink():
        raise UserError(f"{out_file} exists; choose another -o")
    step_dir = checkpoint_to_use(run_dir, checkpoint, warn)
    run = _run_without_data(recipe, run_dir)
    ckpt.load_checkpoint(Path(step_dir), run.model)
    adapter = ADAPTERS[recipe.method.adapter]
    if adapter.unwrap is not None:
        adapter.unwrap(run.model.backbone, True)
    return write_gguf(run.model.backbone, source, out_file, note=warn, recorded=recorded,
                      types_from_file=recipe.quant.format == "gguf")


def _recorded_model_file(run_dir: Path) -> dict | None:
    """The GGUF file the run's model was read from, as training recorded it (data.json's "model": resolved path,
    size, SHA-256), or None (a model not read from a GGUF file, or a run directory from before the record)."""
    import json

    from ftkit.data import provenance

    try:
        return json.loads((run_dir / provenance.RECORD).read_text()).get("model")
    except (OSError, ValueError):
        return None


def _run_without_data(recipe: Recipe, run_dir: Path):
    """The run's model as training built it, without reading its data: the labels come from the recipe, a head
    initialised from the data from the run directory's record. A run directory from before the record was kept is
    built from its data, as then."""
    from ftkit.data import provenance
    from ftkit.data.dataset import TaskData, task_spec
    from ftkit.training.setup import build_run

    if not (run_dir / provenance.RECORD).is_file():
        return build_run(recipe, splits=("train",))
    spec = task_spec(recipe)
    task = TaskData(name=recipe.data.task, spec=spec, labels=list(spec.label_words))
    run = build_run(recipe, num_classes=len(task.labels))
    run.task = task
    head = run_dir / rundir.INITIAL_HEAD
    if head.is_file():
        from safetensors.torch import load_file

        run.model.head.load_state_dict(load_file(str(head)))
    return run


def _check_export_target(out_dir: Path) -> None:
    if out_dir.is_symlink():
        raise UserError(f"-o {out_dir} is a symbolic link; give the directory itself")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} exists and is not an empty directory; choose another -o")


def _write_export(out_dir: Path, run, adapters: dict, step_dir: Path, merge: bool) -> None:
    import json

    from safetensors.torch import save_file

    from ftkit.quant.io import export_hf

    model, kind, task = run.model, run.kind, run.task
    export_hf(model.backbone, run.tokenizer, out_dir)
    if adapters:
        save_file(adapters, str(out_dir / "ftkit_adapter.safetensors"))
    if kind == "encoder":
        head = {f"head.{k}": v for k, v in model.head.state_dict().items()}
        if model.pre_head is not None:
            head.update({f"pre_head.{k}": v for k, v in model.pre_head.state_dict().items()})
        save_file({k: v.contiguous() for k, v in head.items()}, str(out_dir / "ftkit_head.safetensors"))
    (out_dir / "ftkit_task.json").write_text(json.dumps(
        {"task": task.name, "kind": kind, "labels": task.labels, "label_words": task.label_words,
         "pooling": "mean" if kind == "encoder" else None, "checkpoint": str(Path(step_dir).resolve()),
         "adapter": run.recipe.method.adapter, "merged": merge, "recipe": recipe_to_dict(run.recipe)}, indent=2))
