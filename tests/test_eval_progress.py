"""`ftkit eval`'s progress: batches done out of the total with an ETA, quiet for a short evaluation, sparse plain lines
off a terminal."""

from __future__ import annotations

import io

import torch
from conftest import TINY_LLAMA, tiny_recipe
from rich.console import Console

from ftkit.data.batches import encode
from ftkit.data.dataset import load_task_data
from ftkit.eval import evaluate
from ftkit.models.build import build_model
from ftkit.models.load import load_tokenizer
from ftkit.recipe import recipe_from_dict
from ftkit.training.progress import EvalProgress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_eval_progress_is_quiet_when_short_and_prints_sparse_lines_with_an_eta():
    text, clock = io.StringIO(), Clock()
    console = Console(file=text, force_terminal=False, width=120)
    quick = EvalProgress(console, "eval dev", delay=3.0, every=10.0, clock=clock)
    for done in range(1, 6):
        clock.now += 0.5
        quick(done, 5)
    quick.close()
    assert text.getvalue() == ""
    clock.now = 0.0
    slow = EvalProgress(console, "eval dev", delay=3.0, every=10.0, clock=clock)
    for done in range(1, 11):
        clock.now += 4.0  # 4 s a batch: lines at 12 s, 24 s, 36 s (every 10 s at most)
        slow(done, 10)
    slow.close()
    lines = text.getvalue().splitlines()
    assert lines == ["eval dev: 3/10 batches  12s  ETA 28s", "eval dev: 6/10 batches  24s  ETA 16s",
                     "eval dev: 9/10 batches  36s  ETA 4s"]


def test_evaluate_reports_each_batch_done():
    recipe = recipe_from_dict(tiny_recipe(model={"config": dict(TINY_LLAMA)}))
    task = load_task_data(recipe, splits=("train",))
    tokenizer = load_tokenizer(recipe.model)
    model, kind, _ = build_model(recipe, task, tokenizer)
    features = encode(task.splits["train"][:10], tokenizer, kind, task, 32)
    calls = []
    with torch.no_grad():
        plain = evaluate(model, features, "classification", 4, tokenizer.pad_token_id, 2)
        followed = evaluate(model, features, "classification", 4, tokenizer.pad_token_id, 2,
                            progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)] and followed == plain
