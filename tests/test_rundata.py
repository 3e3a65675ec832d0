"""A run directory is self-sufficient: it records where each split came from (data.json), so eval and resume read
those files from any working directory without FTKIT_DATA_DIR, a changed or vanished file is named in one line,
and export needs no data at all. Also: the closing line of a run, merge without an adapter, a recipe's own test
file under MeZO's protocol, and a quiet start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA_DIR, REPO, tiny_recipe
from safetensors.torch import load_file
from typer.testing import CliRunner

from ftkit.cli import app
from ftkit.data import provenance
from ftkit.data.dataset import load_task_data
from ftkit.errors import RecipeError
from ftkit.recipe import load_recipe
from ftkit.training.loop import train
from ftkit.training.metrics import read_events


def small_sst2(folder: Path, rows: int = 120) -> tuple[Path, Path]:
    """Copies of the first rows of SST-2's train and dev files, which a test may change or remove."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ("train.tsv", "dev.tsv"):
        lines = (DATA_DIR / "sst2" / name).read_text().splitlines(keepends=True)[: rows + 1]
        (folder / name).write_text("".join(lines))
        paths.append(folder / name)
    return paths[0], paths[1]


def trained(write_recipe, tmp_path, name="run", **sections) -> Path:
    sections.setdefault("train", {}).update(max_steps=4, output_dir=str(tmp_path / name))
    train(load_recipe(write_recipe(tiny_recipe(**sections), f"{name}.yaml")))
    return tmp_path / name


@pytest.fixture
def plain_shell(tmp_path, monkeypatch):
    """Another working directory, no FTKIT_DATA_DIR, hub access not switched off, and any hub read a failure."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked for data the run directory records")

    def enter():
        monkeypatch.chdir(elsewhere)
        for name in ("FTKIT_DATA_DIR", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr("ftkit.data.dataset._read_hub", no_hub)

    return enter


def test_eval_and_resume_read_the_recorded_files_from_another_shell(write_recipe, tmp_path, plain_shell):
    run_dir = trained(write_recipe, tmp_path)
    record = json.loads((run_dir / "data.json").read_text())
    assert record["task"] == "sst2" and set(record["splits"]) == {"train", "dev"}  # dev is drawn from train
    train_file = record["splits"]["train"]
    assert train_file["path"] == str((DATA_DIR / "sst2" / "train.tsv").resolve())
    assert train_file["size"] == (DATA_DIR / "sst2" / "train.tsv").stat().st_size
    assert train_file["sha256"] == provenance.sha256(DATA_DIR / "sst2" / "train.tsv")
    logged = [e for e in read_events(run_dir / "metrics.jsonl") if e["split"] == "dev"][-1]

    plain_shell()
    runner = CliRunner()
    result = runner.invoke(app, ["eval", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["accuracy"] == logged["accuracy"]
    test = runner.invoke(app, ["eval", str(run_dir), "--split", "test", "--json"])
    assert test.exit_code == 0 and json.loads(test.output)["n"] == 872
    resumed = runner.invoke(app, ["train", str(run_dir), "--resume", "train.max_steps=6"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6


def test_a_changed_or_vanished_file_is_named_in_one_line(write_recipe, tmp_path, plain_shell):
    train_file, dev_file = small_sst2(tmp_path / "data")
    run_dir = trained(write_recipe, tmp_path, data={"train_file": str(train_file), "dev_file": str(dev_file),
                                                    "n_train": 64, "n_dev": 32})
    plain_shell()
    runner = CliRunner()
    size = train_file.stat().st_size
    with train_file.open("a") as handle:
        handle.write("an extra sentence\t1\n")
    changed = runner.invoke(app, ["eval", str(run_dir)])
    assert changed.exit_code == 2
    assert changed.output.strip().splitlines() == [
        f"error: sst2 train data: {train_file}, recorded in the run's data.json, has changed since the run read it "
        f"(size {size:,} -> {train_file.stat().st_size:,} bytes); restore it, set FTKIT_DATA_DIR to a directory "
        f"holding an identical sst2/train.tsv, or give the file to use with data.train_file=PATH (ftkit eval)"]
    refused = runner.invoke(app, ["train", str(run_dir), "--resume", "train.max_steps=6"])
    assert refused.exit_code == 2 and "has changed since the run read it" in refused.output

    train_file.unlink()
    gone = runner.invoke(app, ["eval", str(run_dir)])
    assert gone.exit_code == 2 and len(gone.output.strip().splitlines()) == 1
    assert f"{train_file}, recorded in the run's data.json, is gone" in gone.output

    # An identical copy where FTKIT_DATA_DIR points is the same data; a file named on the command line wins.
    copy = tmp_path / "moved"
    small_sst2(copy / "sst2")
    os.environ["FTKIT_DATA_DIR"] = str(copy)
    try:
        found = runner.invoke(app, ["eval", str(run_dir), "--json"])
    finally:
        del os.environ["FTKIT_DATA_DIR"]
    assert found.exit_code == 0, found.output
    named = runner.invoke(app, ["eval", str(run_dir), f"data.train_file={copy / 'sst2' / 'train.tsv'}", "--json"])
    assert named.exit_code == 0, named.output
    assert json.loads(named.output)["accuracy"] == json.loads(found.output)["accuracy"]


def test_a_run_directory_without_a_record_looks_its_data_up_as_before(write_recipe, tmp_path):
    run_dir = trained(write_recipe, tmp_path)
    (run_dir / "data.json").unlink()
    result = CliRunner().invoke(app, ["eval", str(run_dir), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["n"] == 32


@pytest.mark.parametrize("model", [{"head_init": "random"}, {"head_init": "prototype"}], ids=["random", "prototype"])
def test_export_reads_no_data_and_writes_what_a_data_built_export_writes(write_recipe, tmp_path, monkeypatch,
                                                                         model):
    # A frozen prototype head is initialised from the data and absent from the checkpoints: the run keeps it.
    run_dir = trained(write_recipe, tmp_path, model=model, method={"freeze": ["^head\\."]})
    assert (run_dir / "initial_head.safetensors").is_file() == (model["head_init"] == "prototype")
    runner = CliRunner()
    record = (run_dir / "data.json").read_bytes()
    (run_dir / "data.json").unlink()  # as a run from before the record: built from its data
    assert runner.invoke(app, ["export", str(run_dir), "-o", str(tmp_path / "from_data")]).exit_code == 0
    (run_dir / "data.json").write_bytes(record)

    def no_data(*args, **kwargs):
        raise AssertionError("export read the task's data")

    monkeypatch.setattr("ftkit.training.setup.load_task_data", no_data)
    monkeypatch.delenv("FTKIT_DATA_DIR")
    result = runner.invoke(app, ["export", str(run_dir), "-o", str(tmp_path / "no_data")])
    assert result.exit_code == 0, result.output
    for name in ("model.safetensors", "ftkit_head.safetensors"):
        expected, actual = load_file(str(tmp_path / "from_data" / name)), load_file(str(tmp_path / "no_data" / name))
        assert set(expected) == set(actual) and all(expected[k].equal(actual[k]) for k in expected), name
    task = json.loads((tmp_path / "no_data" / "ftkit_task.json").read_text())
    assert task["labels"] == ["0", "1"] and task["label_words"] == ["terrible", "great"]


def test_merge_without_an_adapter_exports_the_weights_with_a_note(write_recipe, tmp_path):
    run_dir = trained(write_recipe, tmp_path)
    runner = CliRunner()
    merged = runner.invoke(app, ["export", str(run_dir), "-o", str(tmp_path / "merged"), "--merge"])
    assert merged.exit_code == 0, merged.output
    assert merged.output.splitlines()[0] == (f"note: {run_dir} has no adapter (method.adapter none); its weights are "
                                            f"exported as they are")
    assert runner.invoke(app, ["export", str(run_dir), "-o", str(tmp_path / "plain")]).exit_code == 0
    expected = load_file(str(tmp_path / "plain" / "model.safetensors"))
    actual = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert all(expected[k].equal(actual[k]) for k in expected) and set(expected) == set(actual)


def test_the_closing_line_shows_the_test_metric(write_recipe, tmp_path):
    recipe = write_recipe(tiny_recipe(train={"max_steps": 4, "output_dir": str(tmp_path / "run")}))
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    test = json.loads((tmp_path / "run" / "summary.json").read_text())["test"]["accuracy"]
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("done: 4 steps; dev accuracy") and f"; test accuracy {test:.4f}; peak RSS" in last


def question_task(tmp_path: Path, **files) -> dict:
    """A recipe-defined task over small files: train 40 rows, dev 7, test 5 (labels a/b)."""
    counts = {"train": 40, "dev": 7, "test": 5}
    task = {"text_columns": ["text"], "label_words": {"a": "yes", "b": "no"}, "template": "{text}"}
    for split in files.get("splits", ("train", "dev", "test")):
        path = tmp_path / f"{split}.tsv"
        path.write_text("text\tlabel\n" + "".join(f"{split} {i}\t{'ab'[i % 2]}\n" for i in range(counts[split])))
        task[split] = str(path)
    return task


def test_a_recipe_tasks_own_test_file_is_the_test_set_under_the_protocol(write_recipe, tmp_path):
    def splits(task, **data):
        recipe = load_recipe(write_recipe(tiny_recipe(data={"task": "qt", "tasks": {"qt": task}, **data})))
        loaded = load_task_data(recipe)
        return {name: [e.texts[0].split()[0] for e in rows] for name, rows in loaded.splits.items()}

    drawn = splits(question_task(tmp_path, splits=("train", "test")), n_train=30, n_dev=8)
    assert drawn == {"train": ["train"] * 30, "dev": ["train"] * 8, "test": ["test"] * 5}
    no_dev_drawn = splits(question_task(tmp_path), n_train=30, n_dev=None)
    assert no_dev_drawn == {"train": ["train"] * 30, "dev": ["dev"] * 7, "test": ["test"] * 5}
    without_test = splits(question_task(tmp_path, splits=("train", "dev")), n_train=30, n_dev=8)
    assert without_test == {"train": ["train"] * 30, "dev": ["train"] * 8, "test": ["dev"] * 7}  # MeZO's: dev is test
    with pytest.raises(RecipeError, match=r"data\.tasks\.qt\.dev: .*dev\.tsv would never be read: with data\.n_dev "
                                          r"set, dev is drawn from train"):
        splits(question_task(tmp_path), n_train=30, n_dev=8)


def test_a_lora_start_and_validate_print_no_third_party_note():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    imported = subprocess.run([sys.executable, "-c", "import ftkit, peft"], capture_output=True, text=True, env=env,
                              cwd=REPO)
    assert imported.returncode == 0 and imported.stderr == ""
    validated = subprocess.run([sys.executable, "-m", "ftkit.cli", "validate", "recipes/lora_sst2.yaml"],
                               capture_output=True, text=True, env=env, cwd=REPO)
    assert validated.returncode == 0 and validated.stderr == ""
