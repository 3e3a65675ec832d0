"""`ftkit eval TARGET --harness TASKS`: EleutherAI's lm-evaluation-harness as an evaluator. The run's model is loaded
as `ftkit eval` loads it (its checkpoint into the recipe's model: low-bit layers and adapters as trained, no export)
and handed to `lm_eval.simple_evaluate` as an lm-eval model (ftkit.harness_lm). The extra is optional: without it,
one line says how to install it."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Callable

from ftkit.errors import UserError
from ftkit.recipe import load_recipe
from ftkit.safe_files import make_dir, storage_error, write_atomic

INSTALL = "pip install 'ftkit[eval]'"
RESULTS_DIR = "harness"  # inside a run directory: harness/<tasks>.json
SAVED = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")


def lm_eval_module():
    """lm_eval, or one line naming the extra that installs it."""
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401
    except ImportError:
        raise UserError(f"--harness needs lm-evaluation-harness, an optional extra: {INSTALL}") from None
    return lm_eval


def evaluate_harness(target: Path, tasks: str, include_path: Path | None = None, limit: int | None = None,
                     batch_size: int | None = None, checkpoint: Path | None = None, overrides: list[str] = (),
                     device: str = "auto", warn: Callable[[str], None] = print, log_samples: bool = False) -> dict:
    """lm-eval's tasks `tasks` (comma-separated names, local task YAML files under `include_path` included) on a run
    directory's model (best checkpoint, else last, or `checkpoint`) or a recipe's untrained one. Returns lm-eval's
    result dictionary with `source` (what was evaluated) and, for a run, `saved` (where the results were written,
    atomically: RUN/harness/<tasks>.json, without the per-example samples)."""
    from ftkit.devices import deterministic, resolve_device
    from ftkit.training.environment import using_threads

    names = [name.strip() for name in tasks.split(",") if name.strip()]
    if not names:
        raise UserError("--harness: name at least one task, e.g. --harness sst2_ftkit")
    if include_path is not None and not include_path.is_dir():
        raise UserError(f"--include-path {include_path}: not a directory (give the folder of your task YAML files)")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    recipe, step_dir, ptq = _target(target, checkpoint, list(overrides), warn)
    lm_eval = lm_eval_module()
    manager = _task_manager(names, include_path)
    placed = resolve_device(device)
    with using_threads(recipe.train.threads), deterministic(placed):
        model, tokenizer = _load_model(recipe, step_dir, ptq, placed)
        from ftkit.harness_lm import FtkitLM

        lm = FtkitLM(model, tokenizer, batch_size or recipe.train.eval_batch_size)
        try:
            with quiet():
                output = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                                                 log_samples=log_samples)
        except FileNotFoundError as error:  # a task's data files: relative ones are read from the working directory
            raise UserError(f"--harness {tasks}: {error} (a task's relative data_files are read from the working "
                            f"directory, {Path.cwd()})") from None
    source = str(Path(step_dir).resolve()) if step_dir is not None else f"{target} (untrained)"
    if ptq is not None:
        source += f" + {ptq.format} post-training quantization"
    output["source"] = source
    if target.is_dir():
        output["saved"] = _save(target, names, output, limit, warn)
    return output


@contextlib.contextmanager
def quiet():
    """lm-eval without its notes that do not concern the run: its warnings below errors (a custom dataset's hint
    about --metadata), and no `git describe` of the working directory (which prints "fatal: not a git repository"
    outside one; the saved record names the checkpoint instead)."""
    import lm_eval.evaluator as evaluator

    logger = logging.getLogger("lm_eval")
    level, git_hash = logger.level, evaluator.get_git_commit_hash
    logger.setLevel(logging.ERROR)
    evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        logger.setLevel(level)
        evaluator.get_git_commit_hash = git_hash


def _target(target: Path, checkpoint: Path | None, overrides: list[str], warn):
    """(recipe, step directory or None, post-training quantization or None) as `ftkit eval` reads its target; one
    line when the model is not a causal LM."""
    from ftkit.models.load import load_config, model_kind
    from ftkit.runs import _ptq_spec, checkpoint_to_use, load_run_recipe

    if target.is_dir():
        recipe = load_run_recipe(target)
        ptq = _ptq_spec(recipe, overrides) if overrides else None
        step_dir = checkpoint_to_use(target, checkpoint, warn)
    elif target.is_file():
        if checkpoint is not None:
            raise UserError("--checkpoint applies to a run directory, not to a recipe")
        recipe, step_dir, ptq = load_recipe(target, overrides), None, None
    else:
        raise UserError(f"not found: {target} (give a run directory or a recipe file)")
    if model_kind(recipe.model, load_config(recipe.model)) != "causal_lm":
        raise UserError(f"{target}: --harness needs a causal language model; {recipe.model.name} is an encoder (it "
                        f"classifies with a task head): evaluate it with `ftkit eval {target}`")
    return recipe, step_dir, ptq


def _task_manager(names: list[str], include_path: Path | None):
    """lm-eval's task index (its own tasks and those under `include_path`); one line for names it does not know."""
    from lm_eval.tasks import TaskManager

    manager = None
    if include_path is not None:  # lm-eval's own index of some 15,000 tasks takes seconds: only when needed
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if not all(name in manager.all_tasks for name in names):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        where = f"under --include-path {include_path}" if include_path is not None else "(no --include-path given)"
        raise UserError(f"--harness: unknown task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: not one of "
                        f"lm-eval's tasks nor a task YAML file {where}")
    return manager


def _load_model(recipe, step_dir: Path | None, ptq, device):
    """The recipe's causal LM on `device` with the checkpoint's tensors (no task data read), and its tokenizer."""
    from ftkit.training import checkpoint as ckpt
    from ftkit.training.setup import build_run

    run = build_run(recipe, device, num_classes=max(2, len(recipe.data.label_words or {})))
    if step_dir is not None:
        ckpt.load_checkpoint(Path(step_dir), run.model)
    if ptq is not None:
        from ftkit.quant.convert import quantize_model

        run.model = quantize_model(run.model, ptq)
    return run.model, run.tokenizer


def _save(run_dir: Path, names: list[str], output: dict, limit: int | None, warn) -> str | None:
    from lm_eval.utils import handle_non_serializable

    record = {"source": output["source"], "tasks": names, "limit": limit,
              "lm_eval": __import__("lm_eval").__version__, **{k: output[k] for k in SAVED if k in output}}
    path = run_dir / RESULTS_DIR / f"{'+'.join(names)}.json"
    try:
        make_dir(path.parent)
        write_atomic(path, json.dumps(record, indent=2, default=handle_non_serializable))
    except OSError as error:
        failure = storage_error(error) or error
        warn(f"warning: cannot write {path}: {failure.strerror or failure}; the results are only printed")
        return None
    return str(path)


def result_rows(output: dict) -> list[tuple[str, str, str, str]]:
    """(task, metric, value, standard error) per metric lm-eval reported, for the table `ftkit eval` prints."""
    rows = []
    for task, metrics in output["results"].items():
        for key, value in metrics.items():
            metric, _, filtering = key.partition(",")
            if metric in ("alias", "sample_len") or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filtering}")
            label = metric if filtering in ("", "none") else f"{metric} ({filtering})"
            rows.append((task, label, f"{value:.4f}", f"{stderr:.4f}" if isinstance(stderr, float) else ""))
    return rows
