"""The shared training loop. Every method runs through it: the method owns `step(batch, lr)`, the loop owns steps,
the schedule, evaluation, checkpoints, metrics, progress and signals. Read it top to bottom."""

from __future__ import annotations

import math
import os
import shlex
import signal
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console

from ftkit.adapters import ADAPTERS
from ftkit.data.batches import TrainStream, encode, shard
from ftkit.data.dataset import load_task_data
from ftkit.devices import deterministic, peak_memory_mb, reset_peak_memory, synchronize
from ftkit.distributed import NPROC_ENV, World, close_world, init_world
from ftkit.errors import Interrupted, TrainingDiverged, UserError
from ftkit.eval import evaluate
from ftkit.memory import current_rss_mb, peak_rss_mb, reuse_freed_memory
from ftkit.models.build import build_model
from ftkit.models.count import count_model
from ftkit.models.load import load_tokenizer
from ftkit.optim import OPTIMIZERS
from ftkit.optim.schedules import learning_rate
from ftkit.recipe import Recipe, recipe_to_dict
from ftkit.recipe.compare import computing_differences, non_computing_keys
from ftkit.safe_files import remove, storage_error, write_atomic
from ftkit.training import checkpoint as ckpt
from ftkit.training import rundir
from ftkit.training.environment import check_environment, environment, using_threads
from ftkit.training.metrics import (
    MetricsLog,
    NullLog,
    read_events,
    to_json,
    truncate_after,
)
from ftkit.training.progress import TrainProgress


def run_dir_for(recipe: Recipe) -> Path:
    if recipe.train.output_dir:
        return Path(recipe.train.output_dir)
    return Path("runs") / Path(recipe.source or "recipe").stem


def train(recipe: Recipe, resume: bool | str = False, console: Console | None = None,
          allow_inexact: bool = False) -> dict:
    """Train `recipe` in this process, or as one of the processes torchrun started (see docs/scaling.md): every
    process runs this same loop on the same global batches and holds identical weights; process 0 alone writes.

    `resume`: True continues the run in train.output_dir from its newest intact checkpoint (and fails when there is
    none); "auto" does so when there is one and starts afresh otherwise. A resume continues bit-exactly where the
    run left off; it is refused where that cannot hold (another thread count, device or torch version) unless
    `allow_inexact`."""
    world = init_world(recipe.train.device)
    try:
        with using_threads(recipe.train.threads), deterministic(world.device):
            return _train(recipe, resume, console or Console(), world, allow_inexact)
    finally:
        close_world(world)


def _train(recipe: Recipe, resume: bool | str, console: Console, world: World, allow_inexact: bool) -> dict:
    started, rss_at_start = time.perf_counter(), current_rss_mb()  # after imports, before data and model
    reuse_freed_memory()  # temporaries up to 4 MiB come back from the heap, not as fresh pages (ftkit.memory)
    device = world.device
    reset_peak_memory(device)
    if not world.is_main:
        console = Console(quiet=True)
    run_dir = run_dir_for(recipe)
    held, resume_from = _open_run(run_dir, recipe, resume, world, console)
    try:
        return _run(recipe, run_dir, resume_from, console, world, allow_inexact, started, rss_at_start)
    finally:
        if held is not None:
            held.release()


def _open_run(run_dir: Path, recipe: Recipe, resume: bool | str, world: World, console: Console):
    """Process 0 claims the run directory (lock, checks) and picks the checkpoint to resume from; every process
    learns the outcome, and checks it sees that checkpoint too. Returns (the lock or None, checkpoint or None)."""
    held, outcome, error = None, None, None
    if world.is_main:
        try:
            held, found = _claim(run_dir, recipe, resume, world, console)
            outcome = ("ok", found.name if found else None)
        except UserError as err:
            outcome, error = ("error", str(err)), err
    kind, value = world.all_gather(outcome)[0]
    if kind == "error":
        raise error or UserError(value)
    ckpt_root = run_dir / rundir.CHECKPOINTS
    resume_from = ckpt_root / value if value else None
    views = world.all_gather(resume_from is None or (resume_from / ckpt.TRAINER_STATE).is_file())
    if not all(views):  # several machines, and the run directory is not on a filesystem they share
        if held is not None:
            held.release()
        rank = views.index(False)
        raise UserError(f"process {rank} does not see {resume_from}, which process 0 resumes from: "
                        f"train.output_dir must be on a filesystem every machine shares")
    return held, resume_from


def _claim(run_dir: Path, recipe: Recipe, resume: bool | str, world: World, console: Console):
    continue_with = resume_command(run_dir, world)
    if resume is True:  # --resume: there must be something to resume; --resume auto starts afresh when not
        if not os.path.lexists(run_dir):
            raise UserError(f"cannot resume {run_dir}: it does not exist; start the run without --resume (or with "
                            f"--resume auto, which starts it when there is nothing to resume)")
        if run_dir.is_dir() and not rundir.has_checkpoints(run_dir):
            raise UserError(f"cannot resume {run_dir}: it holds no checkpoint; start the run without --resume (or "
                            f"with --resume auto, which starts it when there is nothing to resume)")
    held = rundir.claim(run_dir, recipe.source, "set train.output_dir to another directory")
    try:
        if held.previous:
            console.print(f"note: {run_dir} was held by {rundir.describe_holder(held.previous)}, which ended without "
                          f"releasing it; taking it over", markup=False)
        ckpt_root = run_dir / rundir.CHECKPOINTS
        ckpt.remove_leftovers(ckpt_root)
        if resume == "auto":
            resume = rundir.has_checkpoints(run_dir)
        if not resume:
            if rundir.has_checkpoints(run_dir):
                raise UserError(f"{run_dir} already holds checkpoints: pass --resume to continue that run "
                                f"({continue_with}), or set train.output_dir to start another")
            return held, None
        _check_same_recipe(run_dir, recipe)
        found, skipped = ckpt.find(ckpt_root, need_method=True)
        if found is None:
            raise UserError(f"cannot resume {run_dir}: none of its {len(skipped)} checkpoints can be resumed from (the "
                            f"newest, {skipped[0]}); start the run again with another train.output_dir")
        for line in skipped:
            console.print(f"warning: skipping damaged checkpoint {line}", markup=False)
        return held, found
    except BaseException:
        held.release()
        raise


def resume_command(run_dir: Path, world: World) -> str:
    """The command that continues this run exactly: the run directory's own recipe.yaml (overrides included, and
    whatever directory it is in now) on the same number of processes."""
    target = shlex.quote(str(run_dir))
    if world.size == 1:
        return f"ftkit train {target} --resume"
    if os.environ.get(NPROC_ENV) == str(world.size):  # started by `ftkit train --nproc N`
        return f"ftkit train {target} --resume --nproc {world.size}"
    return f"torchrun <the same options> -m ftkit train {target} --resume"


def _run(recipe: Recipe, run_dir: Path, resume_from: Path | None, console: Console, world: World,
         allow_inexact: bool, started: float, rss_at_start: float) -> dict:
    device = world.device
    ckpt_root = run_dir / rundir.CHECKPOINTS
    continue_with = resume_command(run_dir, world)
    if resume_from is not None:
        check_environment(ckpt.read_trainer_state(resume_from).get("environment"),
                          f"cannot resume {run_dir} bit-exactly", allow_inexact, device)

    # Data, model, method.
    task = load_task_data(recipe)
    tokenizer = load_tokenizer(recipe.model)
    model, kind, facts = build_model(recipe, task, tokenizer, device)
    features = {split: encode(examples, tokenizer, kind, task, recipe.data.max_seq_len)
                for split, examples in task.splits.items()}
    method = OPTIMIZERS[recipe.method.optimizer].build(model, recipe, world=world)
    stream = TrainStream(features["train"], recipe.train.batch_size, recipe.train.seed, tokenizer.pad_token_id,
                         recipe.train.group_by_length)
    shard_world = world if method.shards_data else None
    chunk_size = chunk_size_for(recipe, world, method.shards_data)
    num_classes = len(task.labels)

    def run_eval(split: str) -> dict:
        return evaluate(model, features[split], task.spec.kind, recipe.train.eval_batch_size, tokenizer.pad_token_id,
                        num_classes, tokenizer, world)

    metric = task.spec.metric
    counts = count_model(model)  # the codes of quantized layers count as parameters, as in count-params
    trainable = counts["trainable"]
    # elapsed: seconds of training so far, across resumes (evaluation included), for plots against wall time
    state = {"step": 0, "best_metric": None, "best_step": None, "dev_at_start": None, "elapsed": 0.0}

    # Fresh start or resume (from a checkpoint written with any number of processes: the weights, the data
    # position and the step count are all there is, and every process loads them).
    if resume_from is not None:
        saved = ckpt.load_checkpoint(resume_from, model, method)
        stream.load_state_dict(saved["stream"])
        ckpt.set_rng_state(saved["rng"])
        state = saved["loop"]
        if world.is_main:
            truncate_after(run_dir / "metrics.jsonl", state["step"])
        console.print(f"resuming {run_dir} from step {state['step']}")
    else:
        torch.manual_seed(recipe.train.seed)
    if world.is_main:
        if resume_from is None:  # a run that stopped before its first checkpoint starts over
            for name in ("metrics.jsonl", "summary.json", "trace.ftz"):
                remove(run_dir / name)
        write_atomic(run_dir / rundir.RECIPE, yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    log = MetricsLog(run_dir, recipe.train.tensorboard) if world.is_main else NullLog()
    console.print(f"{kind} model, {trainable:,} trainable parameters; data: "
                  + ", ".join(f"{s} {len(v)}" for s, v in task.splits.items()))
    if world.size > 1:
        split = (f"chunks of {chunk_size} examples dealt round robin" if method.shards_data
                 else method.describe_sharing(world.size))
        console.print(f"{world.size} processes ({world.backend}): global batch {recipe.train.batch_size}, {split}")

    if state["step"] == 0 and recipe.train.eval_at_start and "dev" in features:
        dev = run_eval("dev")
        state["dev_at_start"] = dev
        log.write({"step": 0, "split": "dev", **dev})
        console.print(f"dev {metric} at step 0: {dev[metric]:.4f}")

    # SIGINT / SIGTERM: finish the step, save, and leave.
    stop = {"signum": None}
    handlers = {s: signal.signal(s, lambda signum, frame: stop.update(signum=signum))
                for s in (signal.SIGINT, signal.SIGTERM)}

    adapter = ADAPTERS[recipe.method.adapter]
    descriptions = {} if adapter.trains_base else {"adapter_config.json": adapter_description(recipe)}

    def save(step: int, is_best: bool = False) -> None:
        """Process 0 writes; the others hold the same weights and data position."""
        if world.is_main:
            trainer_state = {"loop": state, "stream": stream.state_dict(), "recipe_source": recipe.source,
                             "processes": world.size, "environment": environment(device)}
            try:
                ckpt.save_checkpoint(ckpt_root, step, model, method, trainer_state, recipe.train.keep_last, is_best,
                                     descriptions)
            except ckpt.SaveFailed as err:
                raise ckpt.SaveFailed(f"{err}; make room, then continue with: {continue_with}") from None

    progress = TrainProgress(console, recipe.train.max_steps, state["step"], recipe.train.log_every)
    loop_started, first_step = time.perf_counter(), state["step"]
    elapsed_before = state.get("elapsed", 0.0)  # checkpoints from before this field have none

    def elapsed() -> float:
        return round(elapsed_before + time.perf_counter() - loop_started, 3)

    method.begin(run_dir, state["step"] if resume_from is not None else None)
    try:
        for step in range(state["step"], recipe.train.max_steps):
            lr = learning_rate(step, recipe.train)
            batch = shard(stream.next_features(), chunk_size, tokenizer.pad_token_id, shard_world, step).to(device)
            metrics = method.step(batch, lr)
            done = step + 1
            if not math.isfinite(metrics["loss"]):
                last = ckpt.resolve(ckpt_root)
                raise TrainingDiverged(f"the loss became {metrics['loss']} at step {done} (lr {lr:.3g}); "
                                       f"last good checkpoint: {last or 'none'}; try a lower train.lr")
            state["step"], state["elapsed"] = done, elapsed()
            log.write({"step": done, "split": "train", "lr": lr, **metrics, "elapsed": state["elapsed"]})
            progress.update(done, metrics["loss"])

            improved = False
            is_last = done == recipe.train.max_steps
            if "dev" in features and ((recipe.train.eval_every and done % recipe.train.eval_every == 0) or is_last):
                dev = run_eval("dev")
                state["elapsed"] = elapsed()
                log.write({"step": done, "split": "dev", **dev, "elapsed": state["elapsed"]})
                progress.message(f"step {done}: dev {metric} {dev[metric]:.4f}  loss {dev['loss']:.4f}")
                if state["best_metric"] is None or dev[metric] > state["best_metric"]:
                    state["best_metric"], state["best_step"], improved = dev[metric], done, True
            signum = world.all_max(stop["signum"] or 0)  # a signal to any process stops them all, together
            periodic = recipe.train.save_every and done % recipe.train.save_every == 0
            if periodic or is_last or improved or signum:
                save(done, is_best=improved)
            if signum and not is_last:
                raise Interrupted(signum, f"interrupted at step {done}; checkpoint saved in {ckpt_root}; "
                                  f"continue with: {continue_with}")
    except OSError as err:  # metrics or the trace could not be written: the checkpoints so far are intact
        failure = storage_error(err) or err
        raise UserError(f"cannot write {getattr(err, 'filename', None) or run_dir}: {failure.strerror or failure}; "
                        f"the last intact checkpoint is {ckpt.resolve(ckpt_root) or 'none'}; make room, then "
                        f"continue with: {continue_with}") from None
    finally:
        method.end()
        progress.close()
        for s, handler in handlers.items():
            signal.signal(s, handler)
        log.close()

    # Final figures: test split (if any) on the best checkpoint's weights.
    synchronize(device)
    seconds_per_step = (time.perf_counter() - loop_started) / max(1, state["step"] - first_step)
    steps_run = state["step"] - first_step
    world.barrier()  # process 0's last checkpoint is on disk before anyone reads it
    test = None
    if "test" in features:
        best = ckpt.resolve(ckpt_root, "best")
        if best is not None:
            ckpt.load_checkpoint(best, model)
        test = run_eval("test")
    if not world.is_main:
        return {"metric": metric, "steps": state["step"], "rank": world.rank}
    summary = {
        "recipe": recipe.source, "kind": kind, "steps": state["step"], **facts,
        "dev_at_start": state["dev_at_start"], "dev": _last_dev(run_dir), "metric": metric,
        "best_step": state["best_step"], "best_dev": state["best_metric"],
        "trainable_params": trainable, "total_params": counts["total"],
        "processes": world.size, "environment": environment(device),
        "peak_rss_mb": peak_rss_mb(), "rss_at_start_mb": rss_at_start, **peak_memory_mb(device),
        "wall_seconds": time.perf_counter() - started, "seconds_per_step": seconds_per_step if steps_run else None,
    }
    if test is not None:
        summary["test"] = test
        test_log = MetricsLog(run_dir)
        test_log.write({"step": state["best_step"] or state["step"], "split": "test", **summary["test"]})
        test_log.close()
    write_atomic(run_dir / "summary.json", to_json(summary, indent=2) + "\n")
    return summary


def chunk_size_for(recipe: Recipe, world: World, shards_data: bool) -> int | None:
    """train.micro_batch_size; with several processes splitting the batch and none set, an equal share each."""
    size = recipe.train.micro_batch_size
    if world.size == 1 or not shards_data:
        return size
    batch = recipe.train.batch_size
    size = size or math.ceil(batch / world.size)
    chunks = math.ceil(batch / size)
    if chunks < world.size:
        raise UserError(f"train.batch_size {batch} in chunks of train.micro_batch_size {size} is {chunks} chunk(s) "
                        f"for {world.size} processes, and each needs one: set train.micro_batch_size to "
                        f"{batch // world.size} or less")
    return size


def adapter_description(recipe: Recipe) -> dict:
    """What an adapter checkpoint needs to be read without the recipe: method, options, base model, format."""
    adapter, data = ADAPTERS[recipe.method.adapter], recipe_to_dict(recipe)
    options = data["method"][adapter.section.name] if adapter.section else {}
    return {"adapter": adapter.name, "options": options, "base_model": recipe.model.name,
            "base_config": recipe.model.config, "quant": data["quant"],
            "weights": ckpt.WEIGHTS, "contents": "adapter tensors, trained norms and task head"}


def _check_same_recipe(run_dir: Path, recipe: Recipe) -> None:
    """A resume continues the computation its run directory's recipe.yaml describes, so it needs that file."""
    if not (run_dir / rundir.RECIPE).is_file():
        raise UserError(f"cannot resume {run_dir}: its {rundir.RECIPE} is missing, so nothing says what the run "
                        f"computed; restore it (a copy of the recipe as run, overrides included) or start another run")
    saved = recipe_to_dict(rundir.read_recipe(run_dir))
    differences = computing_differences(saved, recipe_to_dict(recipe))
    if differences:
        key, before, now = differences[0]
        raise UserError(f"cannot resume {run_dir}: {key} was {before!r} and is now {now!r}; a resumed run must "
                        f"compute the same thing (only {', '.join(sorted(non_computing_keys()))} may change)")


def _last_dev(run_dir: Path) -> dict | None:
    devs = [e for e in read_events(run_dir / "metrics.jsonl") if e["split"] == "dev"]
    return devs[-1] if devs else None

