"""Fault injection: what a hostile but ordinary user can do to ftkit's inputs and run directories.

Two writers on one run directory, links planted in it, bit flips, truncations and deleted files in checkpoints, a
crafted pickle, a full disk, kill -9 in the middle of saves, interrupted runs continued by the command they print,
copied run directories, damaged traces and recipes, and data files in the wrong encoding or shape. Each ends in the
right behaviour or in one line (exit status 2), and nothing already written is lost or mixed with another run's.

Runs are tiny (a 2-layer BERT on 48 SST-2 sentences, 16 for dev, no test split); two finished runs are trained once
for the module and copied by the tests that damage them.
"""

from __future__ import annotations

import errno
import json
import os
import random
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DATA_DIR, REPO, tiny_recipe
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ftkit.cli import app
from ftkit.data.dataset import load_task_data
from ftkit.distributed import NPROC_ENV, World
from ftkit.errors import DataError, RecipeError, UserError
from ftkit.optim.zo import TRACE_FILE
from ftkit.recipe import load_recipe, recipe_from_dict
from ftkit.training import checkpoint as ckpt
from ftkit.training import rundir
from ftkit.training.loop import resume_command, train
from ftkit.training.metrics import read_events

RUNNER = CliRunner()


def cli(*args) -> tuple[int, list[str]]:
    """Run `ftkit ARGS` in this process: its exit status and its output lines."""
    result = RUNNER.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output.strip().splitlines()


def one_error_line(args, expected: str) -> str:
    """`ftkit ARGS` fails with exit status 2 and one line on stderr, which contains `expected` (stdout may hold the
    progress of a run that failed while training)."""
    result = RUNNER.invoke(app, [str(a) for a in args])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert expected in lines[0] and "Traceback" not in result.output, lines[0]
    return lines[0]


# --- tiny runs --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("data")
    for split, rows in (("train", 48), ("dev", 16)):
        lines = (DATA_DIR / "sst2" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()[: rows + 1]
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"train_file": str(folder / "train.tsv"), "dev_file": str(folder / "dev.tsv")}


def tiny(folder: Path, data_files: dict, name: str = "run", **sections) -> Path:
    """A recipe file for a 12-step run into folder/name, saving every 4 steps (all kept)."""
    sections = {key: dict(value) for key, value in sections.items()}
    sections["data"] = {"n_train": None, "n_dev": None, "calibration_examples": 8, **data_files,
                        **sections.get("data", {})}
    sections["train"] = {"max_steps": 12, "save_every": 4, "eval_every": 4, "keep_last": 3, "lr": 3e-3,
                         "output_dir": str(folder / name), **sections.get("train", {})}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(**sections), sort_keys=False))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_files) -> Path:
    """A finished first-order run: checkpoints at steps 4, 8 and 12."""
    folder = tmp_path_factory.mktemp("finished")
    train(load_recipe(tiny(folder, data_files)))
    return folder / "run"


@pytest.fixture(scope="module")
def finished_zo(tmp_path_factory, data_files) -> Path:
    """A finished MeZO run, with its trace."""
    folder = tmp_path_factory.mktemp("finished_zo")
    train(load_recipe(tiny(folder, data_files, method={"optimizer": "mezo"}, train={"lr": 1e-4})))
    return folder / "run"


def copy_run(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to, symlinks=True)
    return to


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / ckpt.step_name(step)


def weights_at(run_dir: Path, step: int) -> dict:
    return load_file(str(step_dir(run_dir, step) / ckpt.WEIGHTS))


def same_bits(a: dict, b: dict) -> bool:
    as_bytes = lambda t: t.contiguous().view(torch.uint8)  # noqa: E731
    return a.keys() == b.keys() and all(torch.equal(as_bytes(a[k]), as_bytes(b[k])) for k in a)


def events(run_dir: Path, split: str) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "elapsed"} for e in read_events(run_dir / "metrics.jsonl")
            if e["split"] == split]


def assert_same_run(run_dir: Path, reference: Path, step: int = 12) -> None:
    """Bit-identical weights at `step`, and the same train and dev events: no step lost, repeated or mixed up."""
    assert same_bits(weights_at(run_dir, step), weights_at(reference, step))
    assert events(run_dir, "train") == events(reference, "train")
    assert events(run_dir, "dev") == events(reference, "dev")


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def strict_json(text: str):
    """JSON as a strict parser reads it: NaN or Infinity are not JSON."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))


# --- 1. one writer per run directory ------------------------------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from ftkit.training import rundir
rundir.claim(Path(sys.argv[1]), None, "wait")
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_writer_is_refused_by_name_and_a_killed_holders_lock_is_taken_over(finished, tmp_path, data_files):
    run_dir = copy_run(finished, tmp_path / "run")
    before = {name: (run_dir / name).read_bytes() for name in ("recipe.yaml", "metrics.jsonl", "summary.json")}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        who = f"is in use by ftkit process {holder.pid} on {socket.gethostname()}"
        longer = tiny(tmp_path, data_files, "run", train={"max_steps": 16})
        one_error_line(["train", longer, "--resume"], who)
        one_error_line(["train", run_dir, "--resume"], who)
        fresh = tiny(tmp_path, data_files, "other", train={"output_dir": str(run_dir)})
        with pytest.raises(UserError, match=who):
            train(load_recipe(fresh), resume="auto")
        assert {name: (run_dir / name).read_bytes() for name in before} == before
    finally:
        holder.kill()
        holder.wait()
    # SIGKILL: the kernel dropped the flock; the lock file still names the dead holder, whose lock is taken over.
    code, lines = cli("train", longer, "--resume")
    assert code == 0, lines
    assert any(f"was held by ftkit process {holder.pid} on {socket.gethostname()}" in line
               and "taking it over" in line for line in lines), lines
    assert json.loads((run_dir / rundir.LOCK).read_text() or "{}") == {}  # released at the end


def test_replay_and_export_write_one_at_a_time(finished_zo, tmp_path, data_files):
    recipe = tiny(tmp_path, data_files, "zo", method={"optimizer": "mezo"}, train={"lr": 1e-4})
    out = tmp_path / "replayed"
    with rundir.claim(out, None, "wait"):  # another replay, in this process: a second open file, the same rule
        one_error_line(["replay", recipe, finished_zo / TRACE_FILE, "-o", out], f"{out} is in use by ftkit process")
    code, lines = cli("replay", recipe, finished_zo / TRACE_FILE, "-o", out)
    assert code == 0, lines
    assert same_bits(weights_at(out, 12), weights_at(finished_zo, 12))
    one_error_line(["train", out, "--resume"], "holds no data position or random state to resume from (ftkit replay "
                                               "rebuilds weights only)")
    one_error_line(["replay", recipe, finished_zo / TRACE_FILE, "-o", out], "already holds checkpoints")
    # Export writes beside its target and renames it into place whole: the loser of a race says so.
    target = tmp_path / "export"
    real_rename = os.rename

    def another_export_got_there_first(src, dst):
        if Path(dst) == target:
            target.mkdir()
            (target / "config.json").write_text("{}")
        real_rename(src, dst)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "rename", another_export_got_there_first)
        one_error_line(["export", out, "-o", target], f"{target} was written by another process meanwhile")
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert not list(tmp_path.glob(".export.tmp-*"))


# --- 2. a run directory is ftkit's alone, and holds no links -------------------------------------------------------

def test_a_project_folder_is_never_a_run_directory(tmp_path, data_files, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    tiny(project, data_files, "recipe", train={"output_dir": "."})  # the user's own recipe.yaml ...
    (project / "metrics.jsonl").write_text('{"mine": 1}\n')  # ... and their own metrics
    before = {p.name: p.read_bytes() for p in project.iterdir()}
    monkeypatch.chdir(project)
    one_error_line(["train", "recipe.yaml"], ". holds files ftkit did not write (metrics.jsonl, recipe.yaml")
    one_error_line(["train", "recipe.yaml", "--resume", "auto"], "holds files ftkit did not write")
    assert {p.name: p.read_bytes() for p in project.iterdir()} == before  # not even a lock file was added


def test_an_output_dir_that_is_a_file_is_refused_before_anything_loads(tmp_path, data_files, monkeypatch):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    monkeypatch.setattr("ftkit.training.setup.load_task_data", lambda *a, **k: pytest.fail("data loaded"))
    one_error_line(["train", tiny(tmp_path, data_files, train={"output_dir": str(taken)})],
                   f"{taken} is a file, not a directory")
    assert taken.read_text() == "mine"


@pytest.mark.parametrize("planted", ["recipe.yaml", "summary.json", "metrics.jsonl", "run.lock", "checkpoints/last",
                                     "checkpoints/step-000016", "checkpoints/step-000002",
                                     "checkpoints/step-000008/method.pt"])
def test_a_link_planted_in_a_run_directory_is_never_followed(finished, tmp_path, data_files, planted, monkeypatch):
    run_dir = copy_run(finished, tmp_path / "run")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    link = run_dir / planted
    if os.path.lexists(link):
        (shutil.rmtree if link.is_dir() and not link.is_symlink() else os.unlink)(link)
    os.symlink(victim / "precious" if "." in link.name and "step-" not in link.name else victim, link)
    monkeypatch.setattr("ftkit.training.setup.load_task_data", lambda *a, **k: pytest.fail("data loaded"))
    expected = "points to" if planted == "checkpoints/last" else f"{link} is a symbolic link"
    recipe = load_recipe(tiny(tmp_path, data_files, "run", train={"max_steps": 16, "keep_last": 1}))
    with pytest.raises(UserError, match=expected):
        train(recipe, resume=True)
    one_error_line(["eval", run_dir], expected)
    assert sorted(p.name for p in victim.iterdir()) == ["precious"] and (victim / "precious").read_text() == "keep me"
    assert link.is_symlink()  # not replaced, not pruned


@pytest.mark.parametrize("name, kind", [("metrics.jsonl", "a directory"), ("checkpoints", "a file")])
def test_a_directory_where_ftkit_keeps_a_file_or_the_other_way_round_is_refused(finished, tmp_path, data_files, name,
                                                                                kind):
    run_dir = copy_run(finished, tmp_path / "run")
    (shutil.rmtree if (run_dir / name).is_dir() else os.unlink)(run_dir / name)
    (run_dir / name).mkdir() if kind == "a directory" else (run_dir / name).write_text("mine")
    one_error_line(["train", run_dir, "--resume", "auto", "train.max_steps=16"], f"{run_dir / name} is {kind}, where")


# --- 3. verified checkpoints ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [ckpt.WEIGHTS, ckpt.METHOD_STATE, ckpt.TRAINER_STATE])
@pytest.mark.parametrize("where", [0.0, 0.003, 0.5, 1.0])
def test_a_flipped_bit_anywhere_is_caught(finished, tmp_path, name, where):
    step = copy_run(step_dir(finished, 12), tmp_path / "step-000012")
    assert ckpt.verify(step, need_method=True) is None
    path = step / name
    flip_byte(path, min(int(where * path.stat().st_size), path.stat().st_size - 1))
    assert f"{name} is not what was saved" in ckpt.verify(step)


@pytest.mark.parametrize("damage, problem", [
    (lambda s: os.truncate(s / ckpt.WEIGHTS, 1000), "weights.safetensors has 1,000 bytes where"),
    (lambda s: os.unlink(s / ckpt.TRAINER_STATE), "trainer_state.json is missing"),
    (lambda s: os.unlink(s / ckpt.MANIFEST), "manifest.json is missing"),
    (lambda s: os.unlink(s / ckpt.WEIGHTS), "weights.safetensors is missing"),
    (lambda s: (s / ckpt.MANIFEST).write_text("[1, 2"), "manifest.json is unreadable"),
], ids=["truncated", "no-state", "no-manifest", "no-weights", "bad-manifest"])
def test_eval_and_export_skip_a_damaged_checkpoint_for_the_newest_intact_one(finished, tmp_path, damage, problem):
    run_dir = copy_run(finished, tmp_path / "run")
    best = ckpt.pointer(run_dir / "checkpoints", "best")
    damage(best)
    fallback = max(p for p in ckpt.step_dirs(run_dir / "checkpoints") if p != best)
    code, lines = cli("eval", run_dir, "--json")
    assert code == 0, lines
    assert lines[0].startswith(f"warning: skipping damaged checkpoint {best}: {problem}"), lines
    assert strict_json(lines[1])["source"] == str(fallback.resolve())
    one_error_line(["eval", run_dir, "--checkpoint", best], f"--checkpoint {best} is not usable: {problem}")
    if problem.startswith("weights.safetensors has"):  # export: the same choice, once
        code, lines = cli("export", run_dir, "-o", tmp_path / "hf")
        assert code == 0 and lines[0].startswith(f"warning: skipping damaged checkpoint {best}"), lines
        assert json.loads((tmp_path / "hf" / "ftkit_task.json").read_text())["checkpoint"] == str(fallback.resolve())


def reseal(step: Path) -> None:
    """Rewrite a checkpoint's manifest to match its files as they now are (a change made on purpose)."""
    files = {p.name: ckpt.fingerprint(p) for p in sorted(step.iterdir()) if p.name != ckpt.MANIFEST}
    (step / ckpt.MANIFEST).write_text(json.dumps({"files": files}))


def test_checkpoints_and_run_directories_of_an_earlier_layout_are_refused_in_one_line(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path / "run")
    for step in ckpt.step_dirs(run_dir / "checkpoints"):  # as checkpoints were before manifests
        (step / ckpt.MANIFEST).unlink()
        state = json.loads((step / ckpt.TRAINER_STATE).read_text())
        del state["checkpoint_format"]
        (step / ckpt.TRAINER_STATE).write_text(json.dumps(state))
    refused = "written in checkpoint layout 1, which this version does not read (it reads layout 2)"
    assert ckpt.verify(step_dir(run_dir, 12)) == refused
    one_error_line(["eval", run_dir, "--checkpoint", step_dir(run_dir, 12)], refused)
    step = step_dir(run_dir, 8)  # a layout named by a manifest-sealed trainer state
    state = json.loads((step / ckpt.TRAINER_STATE).read_text())
    (step / ckpt.TRAINER_STATE).write_text(json.dumps({**state, "checkpoint_format": 3}))
    reseal(step)
    assert ckpt.verify(step) == "written in checkpoint layout 3, which this version does not read (it reads layout 2)"
    (run_dir / rundir.MARKER).unlink()  # as run directories were before run.json marked them
    (run_dir / rundir.LOCK).unlink()
    one_error_line(["train", run_dir, "--resume"], f"{run_dir} is laid out as runs were before run.json marked "
                                                   f"them, a layout this version does not continue")


def test_weights_that_give_a_non_finite_loss_are_reported_and_nan_is_written_as_null(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path / "run")
    step = ckpt.pointer(run_dir / "checkpoints", "best")
    weights = load_file(str(step / ckpt.WEIGHTS))
    weights["head.weight"] = torch.full_like(weights["head.weight"], float("nan"))
    save_file(weights, str(step / ckpt.WEIGHTS))
    reseal(step)  # intact as far as the manifest tells: the loss is what gives it away
    result = RUNNER.invoke(app, ["eval", str(run_dir), "--json"])
    assert result.exit_code == 1
    out, error = result.stdout.strip().splitlines(), result.stderr.strip().splitlines()
    assert strict_json(out[0])["loss"] is None
    assert len(error) == 1 and error[0].startswith(f"error: the loss of {step.resolve()} on dev is nan")


def test_a_nan_dev_loss_is_logged_as_json_null(tmp_path, data_files, monkeypatch):
    import ftkit.training.setup as setup  # where a run's evaluation is called from

    real_evaluate = setup.evaluate
    monkeypatch.setattr(setup, "evaluate", lambda *a, **k: {**real_evaluate(*a, **k), "loss": float("nan")})
    train(load_recipe(tiny(tmp_path, data_files, train={"max_steps": 4})))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [strict_json(line)["loss"] for line in lines if '"dev"' in line] == [None, None]
    assert strict_json((tmp_path / "run" / "summary.json").read_text())["dev"]["loss"] is None


# --- resume past damage, bit for bit --------------------------------------------------------------------------------

def crafted_method_state(step: Path, marker: Path) -> None:
    """A method.pt whose pickle would run a command, with a manifest rewritten to match it."""

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"steps_done": Payload()}, step / ckpt.METHOD_STATE)
    manifest = json.loads((step / ckpt.MANIFEST).read_text())
    manifest["files"][ckpt.METHOD_STATE] = ckpt.fingerprint(step / ckpt.METHOD_STATE)
    (step / ckpt.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", ["bit-flip", "crafted-pickle"])
def test_resume_falls_back_past_a_damaged_checkpoint_and_ends_bit_identical(finished, tmp_path, damage):
    run_dir = copy_run(finished, tmp_path / "run")
    newest = step_dir(run_dir, 12)
    marker = tmp_path / "pwned"
    if damage == "bit-flip":
        flip_byte(newest / ckpt.WEIGHTS, (newest / ckpt.WEIGHTS).stat().st_size // 2)
        problem = "weights.safetensors is not what was saved"
    else:
        crafted_method_state(newest, marker)
        problem = "method.pt cannot be loaded safely (Weights only load failed"
    code, lines = cli("train", run_dir, "--resume")
    assert code == 0, lines
    assert lines[0].startswith(f"warning: skipping damaged checkpoint {newest}: {problem}"), lines
    assert f"resuming {run_dir} from step 8" in lines
    assert_same_run(run_dir, finished)
    assert not marker.exists()


def test_resume_refuses_when_no_checkpoint_is_intact(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path / "run")
    for step in ckpt.step_dirs(run_dir / "checkpoints"):
        flip_byte(step / ckpt.WEIGHTS, 100)
    before = (run_dir / "metrics.jsonl").read_bytes()
    one_error_line(["train", run_dir, "--resume"], f"cannot resume {run_dir}: none of its 3 checkpoints can be resumed "
                                                   f"from (the newest, {step_dir(run_dir, 12)}: weights.safetensors is "
                                                   f"not what was saved")
    one_error_line(["train", run_dir, "--resume", "auto"], "none of its 3 checkpoints can be")  # not a fresh start
    one_error_line(["eval", run_dir], f"{run_dir} has no intact checkpoint: all 3 are damaged (the first tried, ")
    assert (run_dir / "metrics.jsonl").read_bytes() == before


def test_a_zeroth_order_resume_past_a_deleted_state_rewrites_the_same_trace(finished_zo, tmp_path):
    run_dir = copy_run(finished_zo, tmp_path / "run")
    os.unlink(step_dir(run_dir, 12) / ckpt.TRAINER_STATE)
    code, lines = cli("train", run_dir, "--resume")
    assert code == 0 and f"resuming {run_dir} from step 8" in lines, lines
    assert_same_run(run_dir, finished_zo)
    assert (run_dir / TRACE_FILE).read_bytes() == (finished_zo / TRACE_FILE).read_bytes()


# --- 4. resume semantics --------------------------------------------------------------------------------------------

def test_resume_needs_something_to_resume_unless_auto(tmp_path, data_files):
    missing = tiny(tmp_path, data_files, "missing", train={"max_steps": 4})
    one_error_line(["train", missing, "--resume"], f"cannot resume {tmp_path / 'missing'}: it does not exist")
    assert not (tmp_path / "missing").exists()
    (tmp_path / "empty").mkdir()
    empty = tiny(tmp_path, data_files, "empty", train={"max_steps": 4})
    one_error_line(["train", empty, "--resume"], "holds no checkpoint; start the run without --resume")
    assert not list((tmp_path / "empty").iterdir())
    one_error_line(["train", missing, "auto"], "'auto' is not an override (key=value); did you mean --resume auto?")
    code, lines = cli("train", missing, "--resume", "auto")  # nothing there: starts the run
    assert code == 0 and not any(line.startswith("resuming") for line in lines), lines
    code, lines = cli("train", missing, "--resume", "auto", "train.max_steps=6")  # something there: continues it
    assert code == 0 and f"resuming {tmp_path / 'missing'} from step 4" in lines, lines


def test_resume_needs_the_runs_own_recipe(finished, tmp_path, data_files, monkeypatch):
    run_dir = copy_run(finished, tmp_path / "run")
    changed = load_recipe(tiny(tmp_path, data_files, "run", train={"lr": 0.5}))
    (run_dir / "recipe.yaml").unlink()
    monkeypatch.setattr("ftkit.training.setup.load_task_data", lambda *a, **k: pytest.fail("data loaded"))
    with pytest.raises(UserError, match=f"cannot resume {run_dir}: its recipe.yaml is missing"):
        train(changed, resume=True)
    one_error_line(["train", run_dir, "--resume"], f"{run_dir} is not a run directory (no recipe.yaml)")
    (run_dir / "recipe.yaml").write_text("model: {name: minilm\n")  # broken: one line wherever it is read
    with pytest.raises(RecipeError, match=f"{run_dir / 'recipe.yaml'}: not valid YAML"):
        train(changed, resume=True)
    one_error_line(["train", run_dir, "--resume"], f"{run_dir / 'recipe.yaml'}: not valid YAML")
    one_error_line(["eval", run_dir], f"{run_dir / 'recipe.yaml'}: not valid YAML")
    one_error_line(["export", run_dir, "-o", tmp_path / "hf"], "not valid YAML")


def test_a_copied_run_directory_continues_where_it_is_now(finished, tmp_path, data_files):
    copied = copy_run(finished, tmp_path / "elsewhere" / "copy")
    shutil.rmtree(step_dir(copied, 12))  # copied when the run had reached step 8
    before = {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()}
    one_error_line(["train", copied, "--resume", f"train.output_dir={finished}"], "is trained where it is")
    kept_here = tmp_path / "kept-here"  # the run directory itself may be a link: where it is kept is the user's
    kept_here.symlink_to(copied)
    code, lines = cli("train", kept_here, "--resume")
    assert code == 0 and f"resuming {kept_here} from step 8" in lines, lines
    assert_same_run(copied, finished)
    assert load_recipe(copied / "recipe.yaml").train.output_dir == str(kept_here)
    assert {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()} == before  # the original is untouched


def test_the_command_an_interrupted_run_prints_continues_it_exactly(tmp_path, data_files):
    """A real `ftkit train` with overrides on the command line, stopped by SIGINT; a second writer meanwhile is
    refused by name; the printed command, run as printed, ends bit-identical to an uninterrupted run."""
    overrides = ["train.lr=2e-3", "train.seed=7", "train.max_steps=60", "train.save_every=10", "train.log_every=10"]
    path = tiny(tmp_path, data_files, "hinted")
    run_dir = tmp_path / "hinted"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ftkit = [sys.executable, "-m", "ftkit"]
    process = subprocess.Popen([*ftkit, "train", str(path), *overrides], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not any(e["split"] == "train" for e in _events(run_dir)):
        assert process.poll() is None and time.time() < deadline, process.stdout.read()
        time.sleep(0.05)
    with pytest.raises(UserError, match=f"in use by ftkit process {process.pid} on {socket.gethostname()}"):
        train(load_recipe(path, overrides), resume="auto")
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    hint = next(line for line in output.splitlines() if line.startswith("interrupted at step"))
    command = hint.partition("continue with: ")[2]
    assert command == f"ftkit train {run_dir} --resume"
    words = shlex.split(command)
    resumed = subprocess.Popen([*ftkit, *words[1:]], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    train(load_recipe(tiny(tmp_path, data_files, "reference"), overrides))  # meanwhile, the uninterrupted run
    resumed_output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, resumed_output
    assert same_bits(weights_at(run_dir, 60), weights_at(tmp_path / "reference", 60))
    assert events(run_dir, "train") == events(tmp_path / "reference", "train")


def _events(run_dir: Path) -> list[dict]:
    return read_events(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []


def test_the_continue_command_names_the_processes_the_run_used(monkeypatch):
    monkeypatch.delenv(NPROC_ENV, raising=False)
    assert resume_command(Path("runs/my run"), World()) == "ftkit train 'runs/my run' --resume"
    assert resume_command(Path("runs/x"), World(size=2)) == "torchrun <the same options> -m ftkit train runs/x --resume"
    monkeypatch.setenv(NPROC_ENV, "2")
    assert resume_command(Path("runs/x"), World(size=2)) == "ftkit train runs/x --resume --nproc 2"


# --- full disk ------------------------------------------------------------------------------------------------------

NO_SPACE = OSError(errno.ENOSPC, "No space left on device")


def fail_on_second_call(real, fail):
    """`real`, except that its second call runs `fail` instead."""
    calls = []

    def call(*args, **kwargs):
        calls.append(1)
        return fail(*args, **kwargs) if len(calls) == 2 else real(*args, **kwargs)

    return call


def safetensors_out_of_space(tensors, path, **options):
    Path(path).write_bytes(b"half")
    raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")  # as it reports it


def torch_save_out_of_space(obj, handle, *args, **kwargs):
    try:
        raise NO_SPACE
    except OSError:  # as torch.save reports it: a RuntimeError whose context is the OSError
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None


@pytest.mark.parametrize("where", ["weights", "method-state", "manifest"])
def test_a_full_disk_during_a_save_keeps_the_last_intact_checkpoint(finished, tmp_path, data_files, monkeypatch, where):
    if where == "weights":
        monkeypatch.setattr(ckpt, "save_file", fail_on_second_call(ckpt.save_file, safetensors_out_of_space))
    elif where == "method-state":
        monkeypatch.setattr(torch, "save", fail_on_second_call(torch.save, torch_save_out_of_space))
    else:
        real, manifests = ckpt._write_json, []

        def write_json(path, data, indent=None):
            manifests.extend([path] if path.name == ckpt.MANIFEST else [])
            if len(manifests) == 2 and path.name == ckpt.MANIFEST:
                raise NO_SPACE
            real(path, data, indent)

        monkeypatch.setattr(ckpt, "_write_json", write_json)
    run_dir = tmp_path / "run"
    line = one_error_line(["train", tiny(tmp_path, data_files)],
                          f"cannot save checkpoint {step_dir(run_dir, 8)}: No space left on device; nothing "
                          f"half-written was kept, and the last intact checkpoint is {step_dir(run_dir, 4)}")
    assert line.endswith(f"make room, then continue with: ftkit train {run_dir} --resume")
    root = run_dir / "checkpoints"
    assert os.readlink(root / "last") == "step-000004" and sorted(os.listdir(root)) == ["best", "last", "step-000004"]
    monkeypatch.undo()
    if where == "weights":  # followed, the printed command ends as an uninterrupted run
        code, lines = cli(*shlex.split(line.partition("continue with: ")[2])[1:])
        assert code == 0, lines
        assert_same_run(run_dir, finished)


def test_a_full_disk_while_logging_names_the_last_intact_checkpoint(tmp_path, data_files, monkeypatch):
    from ftkit.training.metrics import MetricsLog

    real_write = MetricsLog.write

    def write(self, event):
        if event["step"] == 6:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        real_write(self, event)

    monkeypatch.setattr(MetricsLog, "write", write)
    run_dir = tmp_path / "run"
    one_error_line(["train", tiny(tmp_path, data_files)], f"cannot write {run_dir / 'metrics.jsonl'}: No space "
                                                          f"left on device; the last intact checkpoint is "
                                                          f"{step_dir(run_dir, 4)}")


def test_a_real_full_filesystem(tmp_path, data_files):
    """A 16 MiB tmpfs: the first checkpoint (12 MiB: the weights and AdamW's moments) fits, the second does not.
    Needs mount rights (root); elsewhere the injected errors above stand in for it."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    try:
        run_dir = mount / "run"
        path = tiny(tmp_path, data_files, "run", train={"output_dir": str(run_dir), "keep_last": 1, "eval_every": 0})
        line = one_error_line(["train", path], f"cannot save checkpoint {step_dir(run_dir, 8)}: No space left")
        assert f"the last intact checkpoint is {step_dir(run_dir, 4)}" in line
        root = run_dir / "checkpoints"
        assert os.readlink(root / "last") == "step-000004" and ckpt.verify(step_dir(run_dir, 4)) is None
        assert not [name for name in os.listdir(root) if name.startswith(".")]
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# --- kill -9 at random points of saves ------------------------------------------------------------------------------

class _Method:
    def __init__(self, step: int):
        self.step = step

    def state_dict(self) -> dict:
        return {"steps_done": torch.tensor(self.step)}


def test_kill_9_at_random_points_of_saves_never_loses_or_mixes_checkpoints(tmp_path):
    """A child process saves checkpoints in a loop (the first of a step saved before, which replaces it whole) and is
    killed at a random moment once it has finished two saves, 20 times. After each kill every intact checkpoint
    holds exactly its own step's data, the newest is the last one finished, and `last` points to an intact one."""
    root = tmp_path / "checkpoints"
    # Under torch's grain size, so the forked child never enters a parallel region (OpenMP's pool does not survive
    # a fork).
    model = torch.nn.Linear(100, 100)
    draw, newest = random.Random(0), 0
    for _ in range(20):
        done, told = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: save steps newest, newest + 1, ... until killed, telling each one finished
            try:
                os.close(done)
                step = newest
                while True:
                    with torch.no_grad():
                        model.weight.fill_(step)
                        model.bias.fill_(-step)
                    state = {"loop": {"step": step}, "stream": {"position": step}, "rng": {}}  # what a resume reads
                    ckpt.save_checkpoint(root, step, model, _Method(step), state, keep_last=2,
                                         is_best=step % 3 == 0)
                    os.write(told, step.to_bytes(4, "little"))
                    step += 1
            finally:
                os._exit(0)
        os.close(told)
        finished = [int.from_bytes(_read_exactly(done, 4), "little") for _ in range(2)]
        time.sleep(draw.uniform(0.0, 0.1))  # somewhere in a later save (one takes some tens of milliseconds)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        while chunk := os.read(done, 4):  # saves that finished before the kill
            finished.append(int.from_bytes(chunk, "little"))
        os.close(done)
        ckpt.remove_leftovers(root)  # what a resume does first
        found, skipped = ckpt.find(root, need_method=True)
        assert not skipped and found is not None
        assert int(found.name.split("-")[1]) >= finished[-1] > newest  # nothing finished was lost
        newest = int(found.name.split("-")[1])
        for step in ckpt.step_dirs(root):
            if ckpt.verify(step) is None:  # a step directory being pruned when the kill came is not intact
                number = int(step.name.split("-")[1])
                weights = load_file(str(step / ckpt.WEIGHTS))
                assert torch.all(weights["weight"] == number) and torch.all(weights["bias"] == -number)
                assert ckpt.read_trainer_state(step)["loop"]["step"] == number
        assert ckpt.verify(ckpt.pointer(root, "last")) is None


def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        assert select.select([fd], [], [], 120)[0], "the saving process stopped making progress"
        chunk = os.read(fd, size - len(data))
        assert chunk, "the saving process ended"
        data += chunk
    return data


# --- 5. every input error is one line -------------------------------------------------------------------------------

def test_damaged_traces_are_one_line(tmp_path, data_files, finished_zo):
    recipe = tiny(tmp_path, data_files, "zo", method={"optimizer": "mezo"}, train={"lr": 1e-4})
    real = (finished_zo / TRACE_FILE).read_bytes()
    blob = json.dumps([1, 2, 3]).encode()
    cases = {"ten": b"0123456789", "list": real[:8] + len(blob).to_bytes(4, "little") + blob,
             "short": real[:200], "stray": real + b"\x01\x02", "header": real[:12] + b"[" + real[13:]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        one_error_line(["replay", recipe, tmp_path / name, "-o", tmp_path / f"out-{name}"],
                       f"cannot read trace {tmp_path / name}")
        assert not (tmp_path / f"out-{name}").exists()


def test_a_model_that_ships_its_own_code_is_refused_by_its_recipe_key(tmp_path, data_files):
    model = tmp_path / "custom"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "custom-thing", "hidden_size": 32, "auto_map": {
        "AutoConfig": "configuration_thing.ThingConfig", "AutoModel": "modeling_thing.ThingModel"}}))
    marker = tmp_path / "ran"
    (model / "configuration_thing.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    path = tiny(tmp_path, data_files, model={"name": str(model), "config": None, "tokenizer": "minilm"})
    one_error_line(["train", path], f"model.trust_remote_code: '{model}' ships its own code, which loading it "
                                    f"would run")
    assert not marker.exists()


def test_a_sequence_longer_than_the_models_positions_is_refused_before_training(tmp_path, data_files):
    too_long = tiny(tmp_path, data_files, data={"max_seq_len": 256})  # TINY_BERT has 128 positions
    one_error_line(["validate", too_long], "data.max_seq_len: 256 is more than the 128 positions the model has "
                                           "(max_position_embeddings in its config); set data.max_seq_len to 128")
    minilm = tiny(tmp_path, data_files, "minilm", model={"config": None}, data={"max_seq_len": 1024})
    one_error_line(["validate", minilm], "data.max_seq_len: 1024 is more than the 512 positions")  # its config.json
    unchecked = recipe_from_dict(yaml.safe_load(too_long.read_text()), str(too_long))
    unchecked.source = str(too_long)
    with pytest.raises(RecipeError, match="data.max_seq_len: 256 is more than the 128 positions"):
        train(unchecked)  # a config only loading tells: checked as it loads, before any weight or step
    assert not ckpt.step_dirs(tmp_path / "run" / "checkpoints")


def test_validate_checks_tt_shapes_against_the_models_layers(tmp_path, data_files):
    wrong = tiny(tmp_path, data_files, method={"adapter": "loretta_adp", "loretta": {"shapes": {"down": [4, 8, 8]}}})
    one_error_line(["validate", wrong], "method.loretta.shapes.down: [4, 8, 8] multiplies to 256, but the down factor "
                                        "of this model's layers is a 32 x 64 matrix")
    right = tiny(tmp_path, data_files, method={"adapter": "loretta_adp", "loretta": {"shapes": {"down": [4, 8, 8, 8]}}})
    code, lines = cli("validate", right)
    assert code == 0, lines


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n", "{}\n", "~\n"])
def test_an_empty_recipe_is_refused(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    one_error_line(["validate", path], f"{path}: the recipe is empty")


def data_recipe(tmp_path, name: str, content: bytes):
    """A recipe whose own task reads `content` from a file called `name` (its format from the suffix)."""
    path = tmp_path / name
    path.write_bytes(content)
    task = {"train": str(path), "dev": str(path), "text_columns": ["sentence"], "label_column": "label",
            "label_words": {"0": "bad", "1": "good"}}
    return recipe_from_dict(tiny_recipe(data={"task": "mine", "tasks": {"mine": task}, "n_train": None, "n_dev": None}))


@pytest.mark.parametrize("name, content, expected", [
    ("latin1.tsv", "sentence\tlabel\nfine\t1\nna\u00efve caf\u00e9\t0\n".encode("latin-1"),
     "line 3 is not UTF-8 (byte 0xef); save the file as UTF-8"),
    ("header.tsv", b"sentence\tlabel\n", "no data rows after the header"),
    ("empty.jsonl", b"\n\n", "no data rows in it"),
    ("twice.tsv", b"sentence\tlabel\tlabel\na\t1\t0\n", "line 1: column 'label' appears twice"),
    ("twice.jsonl", b'{"sentence": "a", "label": 1}\n{"sentence": "b", "label": 0, "label": 1}\n',
     "line 2: key 'label' appears twice"),
    ("quoted.csv", b'sentence,label\n"two\nlines",1\n"three\nphysical\nlines",0\nshort\n',
     "line 7 has 1 fields, the header has 2"),
    ("open.csv", b'sentence,label\n"never closed,1\nsecond,0\n', "line 2 has 1 fields"),
], ids=["latin-1", "header-only", "empty", "duplicate-column", "duplicate-key", "quoted-newlines", "open-quote"])
def test_data_file_mistakes_name_the_file_and_its_physical_line(tmp_path, name, content, expected):
    with pytest.raises(DataError) as caught:
        load_task_data(data_recipe(tmp_path, name, content))
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / name}: ") and expected in message and "\n" not in message, message


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    task = load_task_data(data_recipe(tmp_path, "bom.tsv", "sentence\tlabel\nfine\t1\n".encode("utf-8-sig")))
    assert task.splits["train"][0].texts == ("fine",)


def test_n_dev_larger_than_the_file_is_one_line(tmp_path, data_files):
    path = tiny(tmp_path, data_files, data={"dev_file": None, "n_dev": 100})
    one_error_line(["train", path], "data.n_dev = 100 leaves no training rows: ")
    with pytest.raises(DataError, match="data.n_dev = 48 leaves no training rows"):
        load_task_data(load_recipe(tiny(tmp_path, data_files, data={"dev_file": None, "n_dev": 48})))
