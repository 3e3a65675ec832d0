"""Reading run directories: the recipe a run used, its checkpoints, and evaluating them."""

from __future__ import annotations

from pathlib import Path

import yaml

from ftkit.errors import UserError
from ftkit.recipe import Recipe, load_recipe, recipe_from_dict
from ftkit.train import checkpoint as ckpt


def load_run_recipe(run_dir: Path) -> Recipe:
    path = run_dir / "recipe.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no recipe.yaml); give a run directory or a recipe file")
    recipe = recipe_from_dict(yaml.safe_load(path.read_text()), str(path))
    recipe.source = str(path)
    return recipe


def evaluate_target(target: Path, split: str, checkpoint: Path | None = None) -> dict:
    """Evaluate a run directory (its best checkpoint, else last, or `checkpoint`) or a recipe's untrained model."""
    from ftkit.data.batches import encode
    from ftkit.data.dataset import load_task_data
    from ftkit.eval import evaluate
    from ftkit.models.build import build_model
    from ftkit.models.load import load_tokenizer

    if split not in ("dev", "test"):
        raise UserError(f"--split must be dev or test, got {split!r}")
    if target.is_dir():
        recipe = load_run_recipe(target)
        root = target / "checkpoints"
        step_dir = checkpoint or ckpt.resolve(root, "best") or ckpt.resolve(root, "last")
        if step_dir is None:
            raise UserError(f"{target} has no checkpoint yet")
        if not (Path(step_dir) / ckpt.TRAINER_STATE).is_file():
            raise UserError(f"{step_dir} is not a checkpoint directory (no {ckpt.TRAINER_STATE})")
    elif target.is_file():
        recipe, step_dir = load_recipe(target), None
        if checkpoint is not None:
            raise UserError("--checkpoint applies to a run directory, not to a recipe")
    else:
        raise UserError(f"not found: {target} (give a run directory or a recipe file)")

    task = load_task_data(recipe, splits=("train", split))
    if split not in task.splits:
        raise UserError(f"task {task.name} has no {split} split here (found: {', '.join(task.splits)})")
    tokenizer = load_tokenizer(recipe.model)
    model, kind, _ = build_model(recipe, task, tokenizer)
    if step_dir is not None:
        ckpt.load_checkpoint(Path(step_dir), model)
    features = encode(task.splits[split], tokenizer, kind, task, recipe.data.max_seq_len)
    metrics = evaluate(model, features, recipe.train.eval_batch_size, tokenizer.pad_token_id, len(task.labels))
    source = str(Path(step_dir).resolve()) if step_dir is not None else f"{target} (untrained)"
    return {"task": task.name, "split": split, "source": source, **metrics}
