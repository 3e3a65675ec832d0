"""The `ftkit` command: parse, call the library, render with rich. Exit 0 on success, 2 on a user error,
1 on an internal error (with its traceback), 128+N when stopped by signal N after saving."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ftkit.openmp import shorten_openmp_spin

shorten_openmp_spin()  # before anything imports torch

from ftkit.distributed import main_process  # noqa: E402
from ftkit.errors import Interrupted, TrainingDiverged, UserError  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune language models on a small memory budget: QuZO, MeZO, LoRETTA and first-order.")
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

OVERRIDES = typer.Argument(None, help="Dotted overrides, e.g. train.lr=1e-5 train.max_steps=200")


def friendly(command):
    """Turn a user mistake into one line on stderr and exit 2; keep tracebacks for real bugs."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        # Under torchrun every process meets the same mistake; process 0 says it.
        say = err.print if main_process() else (lambda *a, **k: None)
        try:
            return command(*args, **kwargs)
        except UserError as error:
            say(f"error: {error}", markup=False)
            raise typer.Exit(2)
        except TrainingDiverged as error:
            say(f"stopped: {error}", markup=False)
            raise typer.Exit(1)
        except Interrupted as error:
            say(str(error), markup=False)
            raise typer.Exit(128 + error.signum)
        except KeyboardInterrupt:
            err.print("interrupted before training started; nothing was written", markup=False)
            raise typer.Exit(130)

    return wrapper


@app.command()
@friendly
def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML file, or a run directory (its recipe.yaml, as run: "
                                  "`ftkit train RUN_DIR --resume` continues it wherever it is now)"),
    overrides: Optional[list[str]] = OVERRIDES,
    resume: bool = typer.Option(False, "--resume", help="Continue the run from its newest intact checkpoint (an "
                                "error when it has none); `--resume auto`: continue it when it has one, else start "
                                "it (for schedulers that requeue jobs)"),
    allow_inexact: bool = typer.Option(False, "--allow-inexact", help="Resume even where the result cannot be "
                                       "bit-identical (another thread count, device or torch version)"),
    nproc: int = typer.Option(1, "--nproc", help="Processes on this machine (runs torchrun --standalone; for "
                              "several machines call torchrun yourself, see docs/scaling.md)"),
):
    """Train a recipe; writes checkpoints and metrics to its run directory."""
    from ftkit.distributed import launched_by_torchrun
    from ftkit.training import rundir
    from ftkit.training.loop import train as run_training

    overrides = list(overrides or [])
    mode = resume
    if resume and "auto" in overrides:  # `--resume auto`: the word lands among the positional arguments
        overrides.remove("auto")
        mode = "auto"
    spec = rundir.recipe_to_train(recipe, overrides)
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    if nproc > 1 and not launched_by_torchrun():
        flags = ["--resume", "auto"] if mode == "auto" else ["--resume"] if resume else []
        flags += ["--allow-inexact"] if allow_inexact else []
        raise typer.Exit(_torchrun(nproc, ["train", str(recipe), *overrides, *flags]))
    summary = run_training(spec, resume=mode, console=out, allow_inexact=allow_inexact)
    if not main_process():
        return
    metric = summary["metric"]
    start = (summary.get("dev_at_start") or {}).get(metric)
    end = (summary.get("dev") or {}).get(metric)
    line = f"done: {summary['steps']} steps"
    if start is not None:
        line += f"; dev {metric} {start:.4f} at step 0"
    if end is not None:
        line += f" -> {end:.4f} at step {summary['steps']}"
    if summary.get("best_step"):
        line += f" (best {summary['best_dev']:.4f} at step {summary['best_step']})"
    test = (summary.get("test") or {}).get(metric)
    if test is not None:  # scored with the best checkpoint's weights, else the last's
        line += f"; test {metric} {test:.4f}"
    line += f"; peak RSS {summary['peak_rss_mb']:,.0f} MiB"
    if "peak_gpu_allocated_mb" in summary:
        line += (f", GPU {summary['peak_gpu_allocated_mb']:,.0f} MiB allocated / "
                 f"{summary['peak_gpu_reserved_mb']:,.0f} MiB reserved")
    out.print(line)


def _torchrun(nproc: int, args: list[str]) -> int:
    """Run `ftkit ARGS` in `nproc` processes on this machine, as `torchrun --standalone` does (torch's elastic
    launcher, in this process); the exit status of the first process that failed, else 0.

    Workers get the cores shared out (OMP_NUM_THREADS, unless set) and up to TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds
    (default here 600, torchrun's is 30) to finish their step and save when the launcher is interrupted."""
    import os
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from ftkit.distributed import NPROC_ENV

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    os.environ[NPROC_ENV] = str(nproc)  # the workers name `--nproc N` in the command that continues the run
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", run_id=str(uuid.uuid4()), max_restarts=0,
                          shutdown_timeout=int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")))
    try:
        elastic_launch(config, entrypoint=sys.executable)("-u", "-m", "ftkit", *args)
    except ChildFailedError as failure:
        return next(iter(sorted(failure.failures.items())))[1].exitcode or 1
    except SignalException as stopped:  # the workers got the signal too: they finished their step and saved
        return 128 + int(stopped.sigval)
    return 0


@app.command("eval")
@friendly
def eval_command(
    target: Path = typer.Argument(..., help="A run directory, or a recipe (evaluates the model it builds, untrained)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="Recipe overrides; for a run, quant.* applies "
                                                    "post-training quantization, e.g. quant.format=int4"),
    split: str = typer.Option("dev", "--split", help="dev or test"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="A step directory (default: best, else last)"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
    device: str = typer.Option("auto", "--device", help="auto (a GPU when one is visible), cpu, cuda or cuda:N; "
                               "a run trained on a GPU evaluates on a CPU and the other way round"),
    harness: Optional[str] = typer.Option(None, "--harness", help="lm-evaluation-harness tasks, comma-separated, "
                                          "instead of the recipe's task and --split (needs "
                                          "`pip install 'ftkit\\[eval]'`; docs/runs.md)"),
    include_path: Optional[Path] = typer.Option(None, "--include-path", help="--harness: a folder of task YAML files"),
    limit: Optional[int] = typer.Option(None, "--limit", help="--harness: the first N examples of each task"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="--harness: requests per forward pass "
                                             "(default: the recipe's train.eval_batch_size)"),
):
    """Evaluate a finished run, one of its checkpoints, or a recipe's starting point."""
    import math

    if harness is not None:
        return _harness(target, harness, include_path, limit, batch_size, checkpoint, overrides or [], device, as_json)
    if include_path is not None or limit is not None or batch_size is not None:
        raise UserError("--include-path, --limit and --batch-size apply with --harness TASKS")
    from ftkit.runs import evaluate_target
    from ftkit.training.metrics import to_json
    from ftkit.training.progress import EvalProgress

    progress = EvalProgress(err, f"eval {split}")  # on stderr: --json keeps stdout to itself
    try:
        result = evaluate_target(target, split, checkpoint, overrides or [], device, warn=_warn, progress=progress)
    finally:
        progress.close()
    if as_json:
        out.print(to_json(result), markup=False)
    else:
        from ftkit.task_kinds import TASK_KINDS

        columns = [*TASK_KINDS[result["kind"]].metrics, "loss"]
        table = Table(title=f"{result['task']} {result['split']} ({result['n']} examples)")
        for column in ("source", *columns):
            table.add_column(column)
        table.add_row(result["source"], *(f"{result[column]:.4f}" for column in columns))
        out.print(table)
        by_scoring = {k[len("accuracy_"):]: v for k, v in result.items() if k.startswith("accuracy_")}
        if by_scoring:  # a causal LM's accuracy under each way of scoring candidates, from the same pass
            out.print("accuracy by scoring: " + ", ".join(f"{k} {v:.4f}" for k, v in by_scoring.items()),
                      markup=False)
    if not math.isfinite(result["loss"]):
        err.print(f"error: the loss of {result['source']} on {split} is {result['loss']}: these weights do not give "
                  f"finite outputs (the run diverged, or the checkpoint is damaged)", markup=False)
        raise typer.Exit(1)


def _harness(target, tasks, include_path, limit, batch_size, checkpoint, overrides, device, as_json) -> None:
    from ftkit.harness import evaluate_harness, result_rows

    result = evaluate_harness(target, tasks, include_path, limit, batch_size, checkpoint, overrides, device, _warn)
    if as_json:
        from lm_eval.utils import handle_non_serializable

        out.print(json.dumps({k: result[k] for k in ("source", "results", "saved") if k in result},
                             default=handle_non_serializable), markup=False)
        return
    table = Table(title=f"lm-evaluation-harness: {result['source']}")
    for column in ("task", "metric", "value", "stderr"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for row in result_rows(result):
        table.add_row(*row)
    out.print(table)
    if result.get("saved"):
        out.print(f"saved {result['saved']}", markup=False)


def _warn(line: str) -> None:
    err.print(line, markup=False)


@app.command()
@friendly
def export(
    run_dir: Path = typer.Argument(..., help="A run directory"),
    out_dir: Path = typer.Option(..., "-o", "--out", help="Directory to write (must be new or empty); with "
                                 "--format gguf, the .gguf file (must be new)"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="A step directory (default: best, else last)"),
    merge: bool = typer.Option(False, "--merge", help="Merge LoRETTA_rep / LoRA updates into the weights"),
    fmt: str = typer.Option("hf", "--format", help="hf: a Hugging Face directory; gguf: a GGUF file in the block "
                            "formats the run trained, for runs of a GGUF model (docs/runs.md)"),
):
    """Write a run's model as a Hugging Face directory that from_pretrained loads (quantized weights dequantized),
    or as a GGUF file that llama.cpp runs."""
    from ftkit.runs import export_gguf_run, export_run

    if not run_dir.is_dir():
        raise UserError(f"not a run directory: {run_dir}")
    if fmt not in ("hf", "gguf"):
        raise UserError(f"--format {fmt}: choose hf or gguf")
    if fmt == "gguf":
        written = export_gguf_run(run_dir, out_dir, checkpoint, merge, warn=_warn)
        out.print(f"exported {run_dir} to {written} (llama.cpp loads it; scripts/gguf_check.py compares)", markup=False)
        return
    written = export_run(run_dir, out_dir, checkpoint, merge, warn=_warn)
    out.print(f"exported {run_dir} to {written} (load with transformers' from_pretrained)", markup=False)


@app.command()
@friendly
def replay(
    recipe: Path = typer.Argument(..., help="The run's recipe YAML file"),
    trace: Path = typer.Argument(..., help="The run's trace (runs/<name>/trace.ftz)"),
    out_dir: Path = typer.Option(..., "-o", "--out", help="Run directory to write the rebuilt checkpoint into"),
    overrides: Optional[list[str]] = OVERRIDES,
    allow_inexact: bool = typer.Option(False, "--allow-inexact", help="Replay even where the result cannot be "
                                       "bit-identical (another device or torch version than the trace's)"),
):
    """Rebuild a zeroth-order run's weights from the base model and its trace, without a forward pass."""
    from ftkit.optim import OPTIMIZERS
    from ftkit.recipe import load_recipe
    from ftkit.replay import replay as run_replay

    spec = load_recipe(recipe, overrides or [])
    if not OPTIMIZERS[spec.method.optimizer].zeroth_order:
        zeroth_order = [o.name for o in OPTIMIZERS if o.zeroth_order]
        raise UserError(f"{recipe}: method.optimizer is {spec.method.optimizer}; only zeroth-order runs "
                        f"({', '.join(zeroth_order)}) have traces")
    if not trace.is_file():
        raise UserError(f"trace not found: {trace}")
    result = run_replay(spec, trace, out_dir, allow_inexact)
    out.print(f"replayed {result['steps']} steps from {trace} ({result['trace_bytes']:,} bytes) in "
              f"{result['seconds']:.1f} s: {result['checkpoint']}", markup=False)


@app.command()
@friendly
def plot(
    run_dirs: list[Path] = typer.Argument(..., help="One or more run directories"),
    out_file: Path = typer.Option(..., "-o", "--out", help="PNG file to write"),
    labels: Optional[list[str]] = typer.Option(None, "--label", help="A legend label per run (default: its name)"),
    title: Optional[str] = typer.Option(None, "--title"),
):
    """Train loss and dev metric against step and wall time, the runs overlaid, as a PNG."""
    from ftkit.plot import plot_runs

    if labels and len(labels) != len(run_dirs):
        raise UserError(f"--label given {len(labels)} times for {len(run_dirs)} run directories")
    if out_file.suffix.lower() != ".png":
        raise UserError(f"-o {out_file}: write a .png file")
    written = plot_runs(run_dirs, out_file, labels, title)
    out.print(f"wrote {written} ({len(run_dirs)} run{'s' if len(run_dirs) > 1 else ''})", markup=False)


@app.command("count-params")
@friendly
def count_params(
    recipe: Path = typer.Argument(..., help="Recipe YAML file"),
    overrides: Optional[list[str]] = OVERRIDES,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
):
    """Total, trainable and stored bytes per module group, built on the meta device (no weights loaded)."""
    from ftkit.models.count import count_parameters
    from ftkit.recipe import load_recipe

    counts = count_parameters(load_recipe(recipe, overrides or []))
    if as_json:
        out.print(json.dumps(counts), markup=False)
        return
    table = Table(title=str(recipe))
    for column in ("group", "total", "trainable", "stored bytes"):
        table.add_column(column, justify="right" if column != "group" else "left")
    for name, group in sorted(counts["groups"].items()):
        table.add_row(name, f"{group['total']:,}", f"{group['trainable']:,}", f"{group['stored_bytes']:,}")
    table.add_row("[bold]all", f"[bold]{counts['total']:,}", f"[bold]{counts['trainable']:,}",
                  f"[bold]{counts['stored_bytes']:,}")
    out.print(table)
    share = counts["trainable"] / counts["total"] if counts["total"] else 0.0
    out.print(f"total {counts['total']:,}  trainable {counts['trainable']:,} ({share:.2%})  "
              f"backbone {counts['backbone']:,}  stored {counts['stored_bytes']:,} bytes")


@app.command()
@friendly
def validate(
    recipe: Path = typer.Argument(..., help="Recipe YAML file"),
    overrides: Optional[list[str]] = OVERRIDES,
):
    """Check a recipe (keys, types, combinations) without loading any model or data."""
    from ftkit.recipe import load_recipe

    spec = load_recipe(recipe, overrides or [])
    out.print(f"ok: {recipe}: model {spec.model.name}, format {spec.quant.format}, adapter {spec.method.adapter}, "
              f"optimizer {spec.method.optimizer}{_describe_zeroth_order(spec)}, task {spec.data.task}"
              f"{_describe_prompt(spec)}, {spec.train.max_steps} steps", markup=False)


def _describe_prompt(recipe) -> str:
    """What `ftkit validate` says of how a causal LM reads the task: a chat prompt, the candidates' scoring."""
    from ftkit.data.tasks import BUILTIN_TASKS, candidate_scoring
    from ftkit.task_kinds import TASK_KINDS

    d = recipe.data
    spec = d.tasks[d.task] if d.task in d.tasks else BUILTIN_TASKS[d.task].spec
    parts = ["chat prompt" + ("" if d.system is None else f" with system message {d.system!r}")] if d.chat else []
    if TASK_KINDS[spec.kind].ranks_candidates:
        parts.append(f"candidates scored by {candidate_scoring(d)}" + (" (auto)" if d.scoring == "auto" else ""))
    return f" ({', '.join(parts)})" if parts else ""


def _describe_zeroth_order(recipe) -> str:
    """What `ftkit validate` says of a zeroth-order recipe's trainable set and clipping ("" for other recipes)."""
    from ftkit.adapters import ADAPTERS
    from ftkit.optim import OPTIMIZERS
    from ftkit.quant import FORMATS

    if OPTIMIZERS[recipe.method.optimizer].zeroth_order is None:
        return ""
    zo, parts = recipe.method.zo, []
    if zo.low_bit != "codes" and FORMATS[recipe.quant.format].low_bit and ADAPTERS[recipe.method.adapter].trains_base:
        parts.append(f"low-bit layers train their {zo.low_bit}, not their codes")
    if zo.clip_gradient is not None:
        parts.append(f"projected gradients clipped to [-{zo.clip_gradient:g}, {zo.clip_gradient:g}]")
    return "".join(f", {part}" for part in parts)


def main():
    app()


if __name__ == "__main__":
    main()
