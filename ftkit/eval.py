"""Evaluation: run a model over a split and compute the metrics its task kind declares (and the loss)."""

from __future__ import annotations

import torch

from ftkit.data.batches import collate, eval_chunks
from ftkit.devices import model_device, to_device
from ftkit.distributed import SINGLE
from ftkit.task_kinds import TASK_KINDS


@torch.inference_mode()
def evaluate(model, features: list[dict], kind: str, batch_size: int, pad_id: int, num_classes: int, tokenizer=None,
             world=SINGLE, progress=None) -> dict:
    """The task kind's metrics over `features` (ftkit.task_kinds), in eval mode (dropout off): accuracy and
    macro-F1 for classification, accuracy for multiple choice, exact match and token F1 of greedy decoding for
    generation; always the mean loss and the example count `n`.

    Across processes, the length-sorted batches are dealt round robin, each process scores its own, and the
    per-batch results are gathered once and combined in batch order: the same batches, the same padding and the
    same order of additions as one process, so the figures are identical. `progress`, when given, is called with
    (batches done, batches to do) of this process after each of its batches (ftkit.training.progress.EvalProgress)."""
    task_kind, device = TASK_KINDS[kind], model_device(model)
    was_training = model.training
    model.eval()
    try:
        chunks = eval_chunks(features, batch_size)
        owned = [b for b in range(len(chunks)) if world.owns(b)]
        mine = []
        for b in owned:
            batch = to_device(collate([features[i] for i in chunks[b]], pad_id), device)
            mine.append((b, task_kind.score(model, chunks[b], batch, tokenizer)))
            if progress is not None:
                progress(len(mine), len(owned))
        gathered = [part for parts in world.all_gather(mine) for part in parts]
        results = [r for _, r in sorted(gathered, key=lambda part: part[0])]
        return task_kind.combine(results, len(features), num_classes)
    finally:
        model.train(was_training)
