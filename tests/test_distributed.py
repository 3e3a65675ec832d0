"""Several processes (torchrun, gloo): a run on 2 processes computes what one process computes with the same global
batch, bit for bit; sharded evaluation gives the single-process figures; a 2-process run resumes on 1.

Each 2-process run is a real `torchrun --standalone --nproc_per_node 2` of `ftkit train` in a subprocess (the
SIGTERM test's `ftkit train --nproc 2`); the runs registered with `run` share one launch (tests/two_processes.py).
Its single-process reference runs in this process with the same thread count (1), so both compute the same chunks
with the same kernels.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_LLAMA
from safetensors.torch import load_file

from ftkit.distributed import World
from ftkit.errors import UserError
from ftkit.optim.trace import read_trace
from ftkit.optim.zo import TRACE_FILE, ZerothOrder
from ftkit.recipe import load_recipe
from ftkit.training import checkpoint as ckpt
from ftkit.training.loop import chunk_size_for, train
from ftkit.training.metrics import read_events
from two_processes import run, sections_of, write

FIXTURES = REPO / "tests" / "fixtures"


def recipe_file(tmp_path, name: str, **sections) -> Path:
    return write(tmp_path / f"{name}.yaml", tmp_path / name, **sections)


def final(run_dir: Path) -> dict:
    return load_file(str(ckpt.resolve(run_dir / "checkpoints") / ckpt.WEIGHTS))


def same_bits(a: dict, b: dict) -> bool:
    as_bytes = lambda t: t.contiguous().view(torch.uint8)  # noqa: E731
    return a.keys() == b.keys() and all(torch.equal(as_bytes(a[k]), as_bytes(b[k])) for k in a)


def one_and_two_processes(two_process_runs, tmp_path, name: str) -> Path:
    """Train the registered run `name` on one process (here) and find it trained on two: the same weights and the
    same 4-step trace; the two-process run's directory."""
    train(load_recipe(recipe_file(tmp_path, "one", **sections_of(name))))
    two, _ = two_process_runs[name]
    assert same_bits(final(tmp_path / "one"), final(two))
    (_, records_one), (_, records_two) = (read_trace(d / TRACE_FILE) for d in (tmp_path / "one", two))
    assert records_one == records_two and len(records_two) == 4
    return two


def processes(run_dir: Path) -> int:
    return json.loads((run_dir / "summary.json").read_text())["processes"]


def events(run_dir: Path, split: str) -> list[dict]:
    """The run's events of one split, without their wall-clock times."""
    return [{k: v for k, v in e.items() if k != "elapsed"} for e in read_events(run_dir / "metrics.jsonl")
            if e["split"] == split]


ZEROTH_ORDER = [run("quzo int4", method={"optimizer": "quzo"}, quant={"format": "int4"}),
                run("mezo", method={"optimizer": "mezo"}, quant={})]


@pytest.mark.parametrize("name", ZEROTH_ORDER)
def test_zeroth_order_on_two_processes_is_bit_identical_to_one(two_process_runs, tmp_path, name):
    train(load_recipe(recipe_file(tmp_path, "one", **sections_of(name))))
    one, (two, output) = tmp_path / "one", two_process_runs[name]
    assert "2 processes (gloo): global batch 8, chunks of 4 examples dealt round robin" in output
    # Exact, MeZO included: every process applies the same float operations in the same order, and the chunks'
    # losses cross processes unchanged (float64, one process sets each entry) and are added in chunk order.
    assert same_bits(final(one), final(two)) and processes(two) == 2
    if sections_of(name)["quant"]:
        assert any(k.endswith(".codes") for k in final(two))  # the int4 codes themselves were trained
    assert events(one, "train") == events(two, "train")
    # Sharded evaluation (dev every 10 steps, test at the end) gives exactly the single-process figures.
    for split in ("dev", "test"):
        assert events(one, split) == events(two, split)
    (_, records_one), (_, records_two) = (read_trace(d / TRACE_FILE) for d in (one, two))
    assert records_one == records_two and len(records_two) == 20  # process 0 alone wrote the trace
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


QUERIES = run("queries", method={"optimizer": "mezo", "zo": {"n_queries": 4, "parallel": "queries"}})


def test_query_parallel_gives_each_process_half_the_queries_and_the_same_update(two_process_runs, tmp_path):
    train(load_recipe(recipe_file(tmp_path, "one", method={"optimizer": "mezo", "zo": {"n_queries": 4}})))
    two, output = two_process_runs[QUERIES]
    assert "2 processes (gloo): global batch 8, 2 of 4 queries each" in output
    assert same_bits(final(tmp_path / "one"), final(two))
    (_, records_one), (_, records_two) = (read_trace(d / TRACE_FILE) for d in (tmp_path / "one", two))
    assert records_one == records_two and all(len(r["gradients"]) == 4 for r in records_two)


# Global batch 16 in chunks of 4: each process accumulates 2 chunks before DDP averages; dropout is on (tiny BERT's
# 0.1) and seeded per chunk, so the chunks see the same masks on either side.
DDP = run("ddp", method={"optimizer": "adamw"}, train={"batch_size": 16, "lr": 1e-3})


def test_ddp_first_order_matches_one_process_with_gradient_accumulation(two_process_runs, tmp_path):
    train(load_recipe(recipe_file(tmp_path, "one", **sections_of(DDP))))
    one, two = tmp_path / "one", two_process_runs[DDP][0]
    assert processes(two) == 2 and processes(one) == 1
    expected, found = final(one), final(two)
    assert expected.keys() == found.keys() and len(expected) > 30
    # DDP sums the processes' gradients in its own order, so equality is up to float rounding in general (with two
    # processes it happens to be exact: a + b == b + a). AdamW over 20 steps keeps the difference at rounding level.
    for name in expected:
        torch.testing.assert_close(found[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    losses = lambda d: [e["loss"] for e in events(d, "train")]  # noqa: E731
    assert losses(two) == pytest.approx(losses(one), rel=1e-6)
    assert events(two, "dev")[-1]["accuracy"] == events(one, "dev")[-1]["accuracy"]


QA = {"kind": "generation", "train": str(FIXTURES / "qa.jsonl"), "dev": str(FIXTURES / "qa.jsonl"),
      "text_columns": ["question"], "answer_column": "answers", "template": "{question}", "metric": "f1",
      "max_new_tokens": 3}
GENERATION = run("generation", model={"name": "minilm", "config": dict(TINY_LLAMA), "head_init": "random"},
                 data={"task": "qa", "tasks": {"qa": QA}, "max_seq_len": 32, "n_train": None, "n_dev": None},
                 method={"optimizer": "adamw"}, train={"max_steps": 4, "eval_every": 2, "eval_batch_size": 5})


def test_sharded_generation_eval_equals_one_process(two_process_runs, tmp_path):
    train(load_recipe(recipe_file(tmp_path, "one", **sections_of(GENERATION))))
    dev_one, dev_two = events(tmp_path / "one", "dev"), events(two_process_runs[GENERATION][0], "dev")
    assert [e["step"] for e in dev_two] == [0, 2, 4] and all(e["n"] == 48 for e in dev_two)
    assert dev_one == dev_two  # exact match, F1 and loss over the 10 decoded batches, dealt 5 and 5


PARTS = run("parts", "train.max_steps=10", method={"optimizer": "quzo"}, quant={"format": "int4"})


def test_a_two_process_run_resumes_on_one_and_ends_as_an_uninterrupted_run(two_process_runs, tmp_path):
    whole = tmp_path / "whole"
    train(load_recipe(recipe_file(tmp_path, "whole", **sections_of(PARTS))))
    parts = shutil.copytree(two_process_runs[PARTS][0], tmp_path / "parts", symlinks=True)  # 10 steps on 2 processes
    recipe = recipe_file(tmp_path, "parts", **sections_of(PARTS))
    state = ckpt.load_checkpoint(ckpt.resolve(parts / "checkpoints"), _model_of(recipe))
    assert state["loop"]["step"] == 10 and state["processes"] == 2
    train(load_recipe(recipe), resume=True)  # 1 process from here
    assert same_bits(final(whole), final(parts))
    assert events(whole, "train") == events(parts, "train")
    (_, records_whole), (_, records_parts) = (read_trace(d / TRACE_FILE) for d in (whole, parts))
    assert records_whole == records_parts


def _model_of(path: Path):
    from ftkit.data.dataset import load_task_data
    from ftkit.models.build import build_model
    from ftkit.models.load import load_tokenizer

    recipe = load_recipe(path)
    task = load_task_data(recipe)
    return build_model(recipe, task, load_tokenizer(recipe.model))[0]


def test_process_count_mistakes_are_named(tmp_path):
    one_chunk = load_recipe(recipe_file(tmp_path, "chunks", train={"micro_batch_size": 8}))
    with pytest.raises(UserError, match=r"train.batch_size 8 in chunks of train.micro_batch_size 8 is 1 chunk\(s\) "
                                        r"for 2 processes.*set train.micro_batch_size to 4 or less"):
        chunk_size_for(one_chunk, World(rank=0, size=2), shards_data=True)
    assert chunk_size_for(load_recipe(recipe_file(tmp_path, "unset", train={"micro_batch_size": None})),
                       World(rank=1, size=3), shards_data=True) == 3  # 8 over 3 processes: chunks of 3, 3, 2

    queries = load_recipe(recipe_file(tmp_path, "queries", method={
        "optimizer": "mezo", "zo": {"n_queries": 3, "parallel": "queries"}}))
    with pytest.raises(UserError, match=r"method.zo.n_queries \(3\) must be a multiple of the number of processes "
                                        r"\(2\)"):
        ZerothOrder(_model_of(tmp_path / "queries.yaml"), queries, World(rank=0, size=2))


def test_sigterm_to_the_launcher_stops_both_processes_after_the_same_step_with_a_checkpoint(tmp_path):
    import signal
    import time

    path = recipe_file(tmp_path, "run", method={"optimizer": "mezo"},
                       train={"max_steps": 100000, "eval_every": 0, "save_every": 0, "log_every": 10})
    metrics = tmp_path / "run" / "metrics.jsonl"

    def stopped_after_a_step(command: list[str], after: int) -> tuple[str, int]:
        """Run `command`, SIGTERM its launcher once a step past `after` is logged; (its output, the step saved)."""
        process = subprocess.Popen([sys.executable, "-m", *command], cwd=REPO, stdout=subprocess.PIPE,
                                   env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        logged = lambda: [e["step"] for e in read_events(metrics) if e["split"] == "train"]  # noqa: E731
        while not (metrics.is_file() and any(step > after for step in logged())):
            assert process.poll() is None and time.time() < deadline, process.stdout.read()
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 128 + signal.SIGTERM, output
        lines = [line for line in output.splitlines() if line.startswith("interrupted at step")]
        assert len(lines) == 1 and "Traceback" not in output  # process 0 says it, once
        saved = ckpt.resolve(tmp_path / "run" / "checkpoints")
        state = json.loads((saved / ckpt.TRAINER_STATE).read_text())
        assert f"interrupted at step {state['loop']['step']};" in lines[0] and state["processes"] == 2
        assert lines[0].endswith(f"continue with: ftkit train {tmp_path / 'run'} --resume --nproc 2")
        return output, state["loop"]["step"]

    _, first = stopped_after_a_step(["ftkit", "train", str(path), "--nproc", "2"], 0)
    # The printed command, as printed, continues this run on 2 processes from where it stopped.
    output, second = stopped_after_a_step(["ftkit", "train", str(tmp_path / "run"), "--resume", "--nproc", "2"], first)
    assert f"resuming {tmp_path / 'run'} from step {first}" in output and second > first
    assert [e["step"] for e in read_events(metrics) if e["split"] == "train"] == list(range(1, second + 1))
