"""The shared loop: learning, checkpoints that survive crashes, bit-exact resume after SIGKILL, signals, eval."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_recipe
from safetensors.torch import load_file
from typer.testing import CliRunner

from ftkit.cli import app
from ftkit.errors import TrainingDiverged, UserError
from ftkit.optim.first_order import FirstOrder
from ftkit.optim.schedules import learning_rate
from ftkit.recipe import load_recipe
from ftkit.recipe.schema import TrainSpec
from ftkit.training import checkpoint as ckpt
from ftkit.training.loop import train
from ftkit.training.metrics import read_events


def run(write_recipe, tmp_path, name="run", **sections):
    sections.setdefault("train", {})["output_dir"] = str(tmp_path / name)
    return load_recipe(write_recipe(tiny_recipe(**sections), f"{name}.yaml"))


def final_weights(run_dir: Path) -> dict:
    return load_file(str(ckpt.resolve(run_dir / "checkpoints") / ckpt.WEIGHTS))


def train_losses(run_dir: Path) -> list:
    return [(e["step"], e["loss"]) for e in read_events(run_dir / "metrics.jsonl") if e["split"] == "train"]


def test_first_order_training_lowers_the_loss_and_writes_the_run_dir(write_recipe, tmp_path):
    recipe = run(write_recipe, tmp_path, train={"max_steps": 40, "eval_every": 20, "save_every": 0, "lr": 3e-3})
    summary = train(recipe)
    run_dir = tmp_path / "run"
    events = read_events(run_dir / "metrics.jsonl")
    dev = [e for e in events if e["split"] == "dev"]
    assert [e["step"] for e in dev] == [0, 20, 40]
    losses = [e["loss"] for e in events if e["split"] == "train"]
    assert sum(losses[-8:]) < 0.5 * sum(losses[:8])  # 64 sentences: the tiny model fits them
    elapsed = [e["elapsed"] for e in events if e["split"] == "train"]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0  # training seconds so far, for plots against wall time
    assert {e["split"] for e in events} == {"train", "dev", "test"}
    for name in ("recipe.yaml", "summary.json", "checkpoints/last", "checkpoints/best"):
        assert (run_dir / name).exists(), name
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["steps"] == 40 and saved["trainable_params"] == summary["trainable_params"] > 0
    assert saved["test"]["n"] == 872 and saved["peak_rss_mb"] > 0
    assert load_recipe(run_dir / "recipe.yaml").train.max_steps == 40


def test_schedules():
    spec = TrainSpec(max_steps=10, lr=1.0, warmup_steps=2, schedule="linear")
    assert [learning_rate(s, spec) for s in range(3)] == [0.5, 1.0, 1.0]
    assert learning_rate(9, spec) == pytest.approx(1 / 8)
    spec.schedule = "cosine"
    assert learning_rate(2, spec) == 1.0 and learning_rate(6, spec) == pytest.approx(0.5)
    spec.schedule = "constant"
    assert learning_rate(9, spec) == 1.0


def test_keeps_last_k_plus_best(write_recipe, tmp_path):
    recipe = run(write_recipe, tmp_path, train={"max_steps": 20, "save_every": 2, "eval_every": 0, "keep_last": 2})
    train(recipe)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000018", "step-000020"]
    assert os.readlink(root / "last") == "step-000020"


def test_refuses_to_overwrite_a_run_and_resume_checks_the_recipe(write_recipe, tmp_path):
    recipe = run(write_recipe, tmp_path, train={"max_steps": 4})
    train(recipe)
    with pytest.raises(UserError, match="already holds checkpoints: pass --resume"):
        train(recipe)
    changed = run(write_recipe, tmp_path, train={"max_steps": 4, "lr": 0.5})
    with pytest.raises(UserError, match="train.lr was 0.001 and is now 0.5"):
        train(changed, resume=True)


def test_interrupted_save_never_corrupts_last(write_recipe, tmp_path, monkeypatch):
    recipe = run(write_recipe, tmp_path, train={"max_steps": 8, "save_every": 4, "eval_every": 0})
    calls = {"n": 0}
    real_save = ckpt.save_file

    def crash_on_second_save(tensors, path, **options):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(path).write_bytes(b"half a file")
            raise OSError("disk full")
        real_save(tensors, path, **options)

    monkeypatch.setattr(ckpt, "save_file", crash_on_second_save)
    with pytest.raises(ckpt.SaveFailed, match=r"cannot save checkpoint .*step-000008: disk full; nothing half-written "
                                              r"was kept, and the last intact checkpoint is .*step-000004"):
        train(recipe)
    root = tmp_path / "run" / "checkpoints"
    assert os.readlink(root / "last") == "step-000004"
    assert ckpt.resolve(root).name == "step-000004"
    assert len(load_file(str(root / "last" / ckpt.WEIGHTS))) > 0
    monkeypatch.setattr(ckpt, "save_file", real_save)
    summary = train(recipe, resume=True)  # the leftover temporary directory is cleaned and the run goes on
    assert summary["steps"] == 8 and not list(root.glob(".tmp-*"))


def test_non_finite_loss_stops_with_a_clear_message(write_recipe, tmp_path, monkeypatch):
    recipe = run(write_recipe, tmp_path, train={"max_steps": 8, "save_every": 2, "eval_every": 0})
    real_step = FirstOrder.step

    def step(self, batch, lr):
        metrics = real_step(self, batch, lr)
        step.count += 1
        return {**metrics, "loss": float("nan")} if step.count == 5 else metrics

    step.count = 0
    monkeypatch.setattr(FirstOrder, "step", step)
    with pytest.raises(TrainingDiverged, match=r"the loss became nan at step 5 .*last good checkpoint: .*step-000004"):
        train(recipe)
    assert os.readlink(tmp_path / "run" / "checkpoints" / "last") == "step-000004"


# --- subprocess runs: SIGKILL and SIGTERM ----------------------------------------------------------------------

def ftkit(*args, **popen):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "ftkit", *map(str, args)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def wait_for_step(run_dir: Path, step: int, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"run ended early: {process.stdout.read()}")
        path = run_dir / "metrics.jsonl"
        if path.is_file() and any(e["step"] >= step and e["split"] == "train" for e in _events(path)):
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def _events(path):
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


SLOW_ENOUGH = {"max_steps": 60, "save_every": 10, "eval_every": 20, "log_every": 10, "lr": 3e-3}


def test_sigkill_then_resume_is_bit_identical(write_recipe, tmp_path):
    reference = run(write_recipe, tmp_path, "reference", train=dict(SLOW_ENOUGH))
    interrupted = run(write_recipe, tmp_path, "interrupted", train=dict(SLOW_ENOUGH))

    process = ftkit("train", interrupted.source)
    wait_for_step(tmp_path / "interrupted", 33, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    last = ckpt.resolve(tmp_path / "interrupted" / "checkpoints")
    assert last is not None and 10 <= int(last.name.split("-")[1]) < 60

    resumed = ftkit("train", interrupted.source, "--resume")
    train(reference)  # the uninterrupted run, here (same threads: the same bits) while the resumed one starts
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert f"resuming {tmp_path / 'interrupted'} from step" in output

    expected, actual = final_weights(tmp_path / "reference"), final_weights(tmp_path / "interrupted")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert train_losses(tmp_path / "interrupted") == train_losses(tmp_path / "reference")
    dev = lambda d: [(e["step"], e["accuracy"]) for e in read_events(d / "metrics.jsonl") if e["split"] == "dev"]
    assert dev(tmp_path / "interrupted") == dev(tmp_path / "reference")


def test_sigterm_finishes_the_step_saves_and_exits(write_recipe, tmp_path):
    recipe = run(write_recipe, tmp_path, train={**SLOW_ENOUGH, "max_steps": 100000, "save_every": 0})
    process = ftkit("train", recipe.source)
    wait_for_step(tmp_path / "run", 5, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, output
    lines = [line for line in output.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1 and "--resume" in lines[0] and "Traceback" not in output
    saved = ckpt.resolve(tmp_path / "run" / "checkpoints")
    state = json.loads((saved / ckpt.TRAINER_STATE).read_text())
    assert state["loop"]["step"] == int(saved.name.split("-")[1]) >= 5


def test_eval_cli_on_run_dir_and_recipe(write_recipe, tmp_path):
    recipe = run(write_recipe, tmp_path, train={"max_steps": 4})
    train(recipe)
    runner = CliRunner()
    result = runner.invoke(app, ["eval", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert metrics["split"] == "dev" and metrics["n"] == 32 and metrics["source"].endswith("step-000004")
    logged = [e for e in read_events(tmp_path / "run" / "metrics.jsonl") if e["split"] == "dev"][-1]
    assert metrics["accuracy"] == logged["accuracy"] and metrics["loss"] == pytest.approx(logged["loss"], rel=1e-6)
    test = json.loads(runner.invoke(app, ["eval", str(tmp_path / "run"), "--split", "test", "--json"]).output)
    assert test["n"] == 872
    untrained = runner.invoke(app, ["eval", recipe.source, "--json"])
    assert untrained.exit_code == 0 and json.loads(untrained.output)["source"].endswith("(untrained)")
    missing = runner.invoke(app, ["eval", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "not found" in missing.output


def test_sgd_in_bfloat16_runs(write_recipe, tmp_path):
    recipe = run(write_recipe, tmp_path, model={"dtype": "bfloat16"},
                 method={"optimizer": "sgd", "sgd": {"momentum": 0.9}}, train={"max_steps": 6, "lr": 0.05})
    summary = train(recipe)
    weights = final_weights(tmp_path / "run")
    assert summary["steps"] == 6 and all(t.dtype == torch.bfloat16 for t in weights.values())


def test_cli_train_user_errors_are_one_line(write_recipe, tmp_path):
    runner = CliRunner()
    missing_file = write_recipe(tiny_recipe(data={"train_file": str(tmp_path / "absent.tsv")}), "a.yaml")
    result = runner.invoke(app, ["train", str(missing_file)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [f"error: data.train_file: data file not found: {tmp_path / 'absent.tsv'}"]
    (tmp_path / "bad.tsv").write_text("text\tlabel\nfine\t1\n")
    bad_column = write_recipe(tiny_recipe(data={"train_file": str(tmp_path / "bad.tsv")}), "b.yaml")
    result = runner.invoke(app, ["train", str(bad_column)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {tmp_path / 'bad.tsv'}: column 'sentence' not found (columns: text, label)"]


def test_micro_batches_accumulate_to_the_full_batch_step(write_recipe, tmp_path):
    """train.micro_batch_size splits a global batch into chunks whose weighted gradients add up to the batch's."""
    from ftkit.data.batches import encode, micro_batches
    from ftkit.data.dataset import load_task_data
    from ftkit.models.build import build_model
    from ftkit.models.load import load_tokenizer
    from ftkit.optim import OPTIMIZERS

    recipe = run(write_recipe, tmp_path, method={"optimizer": "sgd"}, train={"lr": 0.5})
    task, tokenizer = load_task_data(recipe, splits=("train",)), load_tokenizer(recipe.model)
    features = encode(task.splits["train"][:12], tokenizer, "encoder", task, 32)
    before, updates = None, []
    for size in (None, 5):  # 12 examples: one batch, or chunks of 5, 5 and 2
        model, _, _ = build_model(recipe, task, tokenizer)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0  # the two runs must compute the same function
        before = before or {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        batches = micro_batches(features, size, tokenizer.pad_token_id)
        assert len(batches) == (1 if size is None else 3)
        OPTIMIZERS["sgd"].build(model, recipe).step(batches, 0.5)
        updates.append({n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad})
    # gradients of a whole network summed over chunks instead of at once: the same update, to a relative 1e-4 of
    # the largest one (some tensors' true gradient is zero, e.g. attention key biases: theirs is rounding noise)
    scale = max(u.abs().max().item() for u in updates[0].values())
    for name, update in updates[0].items():
        torch.testing.assert_close(updates[1][name], update, rtol=1e-4, atol=1e-4 * scale, msg=name)


def test_resume_with_another_thread_count_is_refused_unless_inexact_is_allowed(write_recipe, tmp_path):
    threads_before = torch.get_num_threads()
    recipe = run(write_recipe, tmp_path, train={"max_steps": 4, "threads": 1})
    train(recipe)
    longer = load_recipe(recipe.source, ["train.max_steps=6", "train.threads=2"])
    with pytest.raises(UserError, match=r"cannot resume .*bit-exactly: it ran with threads 1 and this process has "
                                        r"2; .*--allow-inexact"):
        train(longer, resume=True)
    assert train(longer, resume=True, allow_inexact=True)["steps"] == 6
    assert torch.get_num_threads() == threads_before  # train.threads holds for the run only


def test_eval_computes_with_the_runs_thread_count_and_restores_the_callers(write_recipe, tmp_path, monkeypatch):
    import ftkit.training.setup
    from ftkit.runs import evaluate_target

    recipe = write_recipe(tiny_recipe(train={"threads": 1}), "one_thread.yaml")
    seen, evaluate = [], ftkit.training.setup.evaluate

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(ftkit.training.setup, "evaluate", recording)  # what a run's evaluation calls
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = evaluate_target(recipe, "dev")
        assert seen == [1] and result["n"] > 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
