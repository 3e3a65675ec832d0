"""The shared training loop. Every method runs through it: the method owns `step(batch, lr)`, the loop owns steps,
the schedule, evaluation, checkpoints, metrics, progress and signals.

`train` claims the run directory (`_open_run`), then runs five steps over one `Training`: `_set_up` (build the run
with ftkit.training.setup, resume it or start it), `_evaluate_at_start`, `_train_steps` (each `_step`: the method's
step, metrics, `_evaluate_dev`, `_save`) and `_finish` (test split, summary)."""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from rich.console import Console

from ftkit.adapters import ADAPTERS
from ftkit.data import provenance
from ftkit.data.batches import TrainStream, shard
from ftkit.data.dataset import SPLITS
from ftkit.devices import deterministic, peak_memory_mb, reset_peak_memory, synchronize
from ftkit.distributed import NPROC_ENV, World, close_world, init_world
from ftkit.errors import Interrupted, TrainingDiverged, UserError
from ftkit.memory import current_rss_mb, peak_rss_mb, reuse_freed_memory
from ftkit.models.count import count_model
from ftkit.models.load import gguf_source, random_weights
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
from ftkit.training.setup import Run, build_run


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
    reset_peak_memory(world.device)
    if not world.is_main:
        console = Console(quiet=True)
    run_dir = run_dir_for(recipe)
    held, resume_from = _open_run(run_dir, recipe, resume, world, console)
    try:
        training = _set_up(recipe, run_dir, resume_from, console, world, allow_inexact)
        _evaluate_at_start(training)
        _train_steps(training)
        return _finish(training, started, rss_at_start)
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


@dataclass
class LoopState:
    """What the loop carries from step to step: saved as "loop" in each checkpoint's trainer_state.json (in this
    order) and read back on resume."""

    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    dev_at_start: dict | None = None
    elapsed: float = 0.0  # seconds of training so far, across resumes (evaluation included), for plots against time


@dataclass
class Training:
    """One process's training of a run: what was built, where it writes, and the state the steps advance."""

    run: Run
    world: World
    run_dir: Path
    console: Console
    stream: TrainStream
    chunk_size: int | None  # examples per chunk of a global batch (train.micro_batch_size, or a share per process)
    counts: dict  # parameters, as count-params gives them: the codes of quantized layers count as parameters
    continue_with: str  # the command that resumes this run, for messages
    descriptions: dict  # files beside an adapter checkpoint's weights that describe it
    state: LoopState = field(default_factory=LoopState)
    resumed: bool = False
    log: MetricsLog | NullLog | None = None
    stop_signal: int | None = None  # SIGINT / SIGTERM arrived: finish the step, save, and leave
    loop_started: float = 0.0  # perf_counter when this process's first step began
    first_step: int = 0  # the step this process began at
    elapsed_before: float = 0.0  # state.elapsed when this process began stepping

    @property
    def recipe(self) -> Recipe:
        return self.run.recipe

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / rundir.CHECKPOINTS

    @property
    def metric(self) -> str:
        return self.run.task.spec.metric

    def has(self, split: str) -> bool:
        return split in self.run.task.splits

    def elapsed(self) -> float:
        return round(self.elapsed_before + time.perf_counter() - self.loop_started, 3)


def _set_up(recipe: Recipe, run_dir: Path, resume_from: Path | None, console: Console, world: World,
            allow_inexact: bool) -> Training:
    """Build the run, restore it from `resume_from` or start it afresh, and announce it."""
    if resume_from is not None:
        check_environment(ckpt.read_trainer_state(resume_from).get("environment"),
                          f"cannot resume {run_dir} bit-exactly", allow_inexact, world.device)
    # A resumed run reads its data where it first read it (run_dir/data.json), whatever the shell's FTKIT_DATA_DIR.
    recorded = provenance.read_record(run_dir, recipe.data.task, set()) if resume_from is not None else None
    run = build_run(recipe, world.device, encode=SPLITS, method=True, world=world, recorded=recorded)
    stream = TrainStream(run.encoded("train"), recipe.train.batch_size, recipe.train.seed, run.pad_id,
                         recipe.train.group_by_length)
    adapter = ADAPTERS[recipe.method.adapter]
    t = Training(run, world, run_dir, console, stream, chunk_size_for(recipe, world, run.method.shards_data),
                 count_model(run.model), resume_command(run_dir, world),
                 {} if adapter.trains_base else {"adapter_config.json": adapter_description(recipe)})
    # A resume loads what a checkpoint written with any number of processes holds (weights, data position, step
    # count) into every process.
    if resume_from is not None:
        _resume(t, resume_from)
    else:
        torch.manual_seed(recipe.train.seed)
    if world.is_main:
        if resume_from is None:  # a run that stopped before its first checkpoint starts over
            for name in ("metrics.jsonl", "summary.json", "trace.ftz", rundir.INITIAL_HEAD):
                remove(run_dir / name)
        write_atomic(run_dir / rundir.RECIPE, yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
        record_data(run, run_dir)
    t.log = MetricsLog(run_dir, recipe.train.tensorboard) if world.is_main else NullLog()
    _announce(t)
    return t


def record_data(run: Run, run_dir: Path) -> None:
    """What the run directory needs to be evaluated and exported anywhere: where each split came from (data.json),
    the GGUF file the model was read from (data.json's "model": path, size, SHA-256), and a head initialised from
    the data that training does not change (initial_head.safetensors), which a checkpoint does not hold."""
    data = provenance.record(run.task.name, run.task.origins)
    model_file = None if random_weights(run.recipe.model) else gguf_source(run.recipe.model, run.recipe.quant)
    if model_file is not None:  # the GGUF file the weights were read from, for an export back to its format
        data["model"] = provenance.file_entry(model_file)
    write_atomic(run_dir / provenance.RECORD, json.dumps(data, indent=2) + "\n")
    head = getattr(run.model, "head", None)
    if "prototype_scale" in run.facts and any(not p.requires_grad for p in head.parameters()):
        from safetensors.torch import save

        write_atomic(run_dir / rundir.INITIAL_HEAD, save({k: v.detach().contiguous().cpu()
                                                          for k, v in head.state_dict().items()}))


def _resume(t: Training, resume_from: Path) -> None:
    saved = ckpt.load_checkpoint(resume_from, t.run.model, t.run.method)
    t.stream.load_state_dict(saved["stream"])
    ckpt.set_rng_state(saved["rng"])
    t.state, t.resumed = LoopState(**saved["loop"]), True
    if t.world.is_main:
        truncate_after(t.run_dir / "metrics.jsonl", t.state.step)
    t.console.print(f"resuming {t.run_dir} from step {t.state.step}")


def _announce(t: Training) -> None:
    t.console.print(f"{t.run.kind} model, {t.counts['trainable']:,} trainable parameters; data: "
                    + ", ".join(f"{s} {len(v)}" for s, v in t.run.task.splits.items()))
    world, method = t.world, t.run.method
    if world.size > 1:
        split = (f"chunks of {t.chunk_size} examples dealt round robin" if method.shards_data
                 else method.describe_sharing(world.size))
        t.console.print(f"{world.size} processes ({world.backend}): global batch {t.recipe.train.batch_size}, {split}")


def _evaluate_at_start(t: Training) -> None:
    if t.state.step == 0 and t.recipe.train.eval_at_start and t.has("dev"):
        dev = t.run.evaluate("dev", t.world)
        t.state.dev_at_start = dev
        t.log.write({"step": 0, "split": "dev", **dev})
        t.console.print(f"dev {t.metric} at step 0: {dev[t.metric]:.4f}")


def _train_steps(t: Training) -> None:
    """Steps from where the state stands to train.max_steps. SIGINT / SIGTERM finish the step, save, and leave."""
    handlers = {s: signal.signal(s, lambda signum, frame: setattr(t, "stop_signal", signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    progress = TrainProgress(t.console, t.recipe.train.max_steps, t.state.step, t.recipe.train.log_every)
    t.loop_started, t.first_step, t.elapsed_before = time.perf_counter(), t.state.step, t.state.elapsed
    t.run.method.begin(t.run_dir, t.state.step if t.resumed else None)
    try:
        for step in range(t.state.step, t.recipe.train.max_steps):
            _step(t, step, progress)
    except OSError as err:  # metrics or the trace could not be written: the checkpoints so far are intact
        failure = storage_error(err) or err
        raise UserError(f"cannot write {getattr(err, 'filename', None) or t.run_dir}: {failure.strerror or failure}; "
                        f"the last intact checkpoint is {ckpt.resolve(t.ckpt_root) or 'none'}; make room, then "
                        f"continue with: {t.continue_with}") from None
    finally:
        t.run.method.end()
        progress.close()
        for s, handler in handlers.items():
            signal.signal(s, handler)
        t.log.close()


def _step(t: Training, step: int, progress: TrainProgress) -> None:
    """One step of the method on the next global batch, then what follows it: metrics, evaluation, checkpoint."""
    recipe, run = t.recipe, t.run
    lr = learning_rate(step, recipe.train)
    shard_world = t.world if run.method.shards_data else None
    batch = shard(t.stream.next_features(), t.chunk_size, run.pad_id, shard_world, step).to(run.device)
    metrics = run.method.step(batch, lr)
    done = step + 1
    if not math.isfinite(metrics["loss"]):
        last = ckpt.resolve(t.ckpt_root)
        raise TrainingDiverged(f"the loss became {metrics['loss']} at step {done} (lr {lr:.3g}); "
                               f"last good checkpoint: {last or 'none'}; try a lower train.lr")
    t.state.step, t.state.elapsed = done, t.elapsed()
    t.log.write({"step": done, "split": "train", "lr": lr, **metrics, "elapsed": t.state.elapsed})
    progress.update(done, metrics["loss"])

    is_last = done == recipe.train.max_steps
    improved = _evaluate_dev(t, done, progress) if _dev_due(t, done) else False
    signum = t.world.all_max(t.stop_signal or 0)  # a signal to any process stops them all, together
    periodic = recipe.train.save_every and done % recipe.train.save_every == 0
    if periodic or is_last or improved or signum:
        _save(t, done, is_best=improved)
    if signum and not is_last:
        raise Interrupted(signum, f"interrupted at step {done}; checkpoint saved in {t.ckpt_root}; "
                          f"continue with: {t.continue_with}")


def _dev_due(t: Training, done: int) -> bool:
    every = t.recipe.train.eval_every
    return t.has("dev") and ((every and done % every == 0) or done == t.recipe.train.max_steps)


def _evaluate_dev(t: Training, done: int, progress: TrainProgress) -> bool:
    """Evaluate on dev after step `done`; whether the metric is the best so far."""
    dev = t.run.evaluate("dev", t.world)
    t.state.elapsed = t.elapsed()
    t.log.write({"step": done, "split": "dev", **dev, "elapsed": t.state.elapsed})
    progress.message(f"step {done}: dev {t.metric} {dev[t.metric]:.4f}  loss {dev['loss']:.4f}")
    if t.state.best_metric is None or dev[t.metric] > t.state.best_metric:
        t.state.best_metric, t.state.best_step = dev[t.metric], done
        return True
    return False


def _save(t: Training, step: int, is_best: bool = False) -> None:
    """Process 0 writes; the others hold the same weights and data position."""
    if not t.world.is_main:
        return
    trainer_state = {"loop": asdict(t.state), "stream": t.stream.state_dict(), "recipe_source": t.recipe.source,
                     "processes": t.world.size, "environment": environment(t.run.device)}
    try:
        ckpt.save_checkpoint(t.ckpt_root, step, t.run.model, t.run.method, trainer_state, t.recipe.train.keep_last,
                             is_best, t.descriptions)
    except ckpt.SaveFailed as err:
        raise ckpt.SaveFailed(f"{err}; make room, then continue with: {t.continue_with}") from None


def _finish(t: Training, started: float, rss_at_start: float) -> dict:
    """The test split (if any) on the best checkpoint's weights, and the summary process 0 writes."""
    device, world, state = t.run.device, t.world, t.state
    synchronize(device)
    steps_run = state.step - t.first_step
    seconds_per_step = (time.perf_counter() - t.loop_started) / max(1, steps_run)
    world.barrier()  # process 0's last checkpoint is on disk before anyone reads it
    test = None
    if t.has("test"):
        best = ckpt.resolve(t.ckpt_root, "best")
        if best is not None:
            ckpt.load_checkpoint(best, t.run.model)
        test = t.run.evaluate("test", world)
    if not world.is_main:
        return {"metric": t.metric, "steps": state.step, "rank": world.rank}
    summary = {
        "recipe": t.recipe.source, "kind": t.run.kind, "steps": state.step, **t.run.facts,
        "dev_at_start": state.dev_at_start, "dev": _last_dev(t.run_dir), "metric": t.metric,
        "best_step": state.best_step, "best_dev": state.best_metric,
        "trainable_params": t.counts["trainable"], "total_params": t.counts["total"],
        "processes": world.size, "environment": environment(device),
        "peak_rss_mb": peak_rss_mb(), "rss_at_start_mb": rss_at_start, **peak_memory_mb(device),
        "wall_seconds": time.perf_counter() - started, "seconds_per_step": seconds_per_step if steps_run else None,
    }
    if test is not None:
        summary["test"] = test
        test_log = MetricsLog(t.run_dir)
        test_log.write({"step": state.best_step or state.step, "split": "test", **summary["test"]})
        test_log.close()
    write_atomic(t.run_dir / "summary.json", to_json(summary, indent=2) + "\n")
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

