"""Evaluation: run a model over a split and compute the task's metrics (and the loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ftkit.data.batches import collate, eval_chunks
from ftkit.distributed import SINGLE
from ftkit.textmetrics import exact_match, token_f1


@torch.inference_mode()
def evaluate(model, features: list[dict], batch_size: int, pad_id: int, num_classes: int, tokenizer=None,
             world=SINGLE) -> dict:
    """Classification and multiple choice: accuracy, macro-F1 (classification) and mean cross-entropy over the
    candidates. Generation: greedy decoding scored by exact match and token F1 (SQuAD normalisation), and the
    answer's language-model loss. Eval mode (dropout off).

    Across processes, the length-sorted batches are dealt round robin, each process scores its own, and the
    per-batch results are gathered once and combined in batch order: the same batches, the same padding and the
    same order of additions as one process, so the figures are identical."""
    was_training = model.training
    model.eval()
    try:
        generation = bool(features) and "answers" in features[0]
        score = _score_generation if generation else _score_candidates
        chunks = eval_chunks(features, batch_size)
        mine = [(b, score(model, chunk, collate([features[i] for i in chunk], pad_id), tokenizer))
                for b, chunk in enumerate(chunks) if world.owns(b)]
        gathered = [part for parts in world.all_gather(mine) for part in parts]
        results = [r for _, r in sorted(gathered, key=lambda part: part[0])]
        combine = _combine_generation if generation else _combine_candidates
        return combine(results, len(features), num_classes)
    finally:
        model.train(was_training)


def _score_candidates(model, indices, batch, tokenizer) -> dict:
    logits = model(batch)
    return {"indices": indices, "predictions": logits.argmax(-1).tolist(), "labels": batch["labels"].tolist(),
            "loss_sum": F.cross_entropy(logits, batch["labels"], reduction="sum").item()}


def _combine_candidates(results: list[dict], n: int, num_classes: int) -> dict:
    predictions = torch.empty(n, dtype=torch.long)
    labels = torch.empty(n, dtype=torch.long)
    loss_sum = 0.0
    for r in results:
        predictions[r["indices"]] = torch.tensor(r["predictions"], dtype=torch.long)
        labels[r["indices"]] = torch.tensor(r["labels"], dtype=torch.long)
        loss_sum += r["loss_sum"]
    result = {"accuracy": (predictions == labels).float().mean().item(), "loss": loss_sum / max(1, n), "n": n}
    if num_classes:
        result["macro_f1"] = macro_f1(predictions, labels, num_classes)
    return result


def _score_generation(model, indices, batch, tokenizer) -> dict:
    if tokenizer is None:
        raise ValueError("evaluating a generation task needs the tokenizer")
    predictions = greedy_answers(model, batch["prompts"], tokenizer)
    return {"loss_sum": -model(batch)[:, 0].sum().item(),
            "exact_match": [exact_match(p, a) for p, a in zip(predictions, batch["answers"])],
            "f1": [token_f1(p, a) for p, a in zip(predictions, batch["answers"])]}


def _combine_generation(results: list[dict], n: int, num_classes: int) -> dict:
    em = f1 = loss_sum = 0.0
    for r in results:
        loss_sum += r["loss_sum"]
        for e, f in zip(r["exact_match"], r["f1"]):
            em += e
            f1 += f
    count = max(1, n)
    return {"exact_match": em / count, "f1": f1 / count, "loss": loss_sum / count, "n": n}


def greedy_answers(model, prompts: list[list[int]], tokenizer) -> list[str]:
    """Greedy decoding after each prompt (left-padded into one batch, KV cache on), cut at the first newline."""
    lm = model.backbone
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = lm.generate(input_ids=input_ids, attention_mask=attention, do_sample=False, use_cache=True,
                      max_new_tokens=model.max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [t.split("\n")[0].strip() for t in texts]


def macro_f1(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    scores = []
    for c in range(num_classes):
        tp = ((predictions == c) & (labels == c)).sum().item()
        fp = ((predictions == c) & (labels != c)).sum().item()
        fn = ((predictions != c) & (labels == c)).sum().item()
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / num_classes
