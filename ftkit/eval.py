"""Evaluation: run a model over a split and compute the task's metrics (and the loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ftkit.data.batches import eval_batches
from ftkit.textmetrics import exact_match, token_f1


@torch.inference_mode()
def evaluate(model, features: list[dict], batch_size: int, pad_id: int, num_classes: int, tokenizer=None) -> dict:
    """Classification and multiple choice: accuracy, macro-F1 (classification) and mean cross-entropy over the
    candidates. Generation: greedy decoding scored by exact match and token F1 (SQuAD normalisation), and the
    answer's language-model loss. Eval mode (dropout off)."""
    was_training = model.training
    model.eval()
    try:
        if features and "answers" in features[0]:
            return _evaluate_generation(model, features, batch_size, pad_id, tokenizer)
        return _evaluate_candidates(model, features, batch_size, pad_id, num_classes)
    finally:
        model.train(was_training)


def _evaluate_candidates(model, features, batch_size, pad_id, num_classes) -> dict:
    predictions = torch.empty(len(features), dtype=torch.long)
    labels = torch.empty(len(features), dtype=torch.long)
    loss_sum = 0.0
    for indices, batch in eval_batches(features, batch_size, pad_id):
        logits = model(batch)
        loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        predictions[indices] = logits.argmax(-1)
        labels[indices] = batch["labels"]
    result = {"accuracy": (predictions == labels).float().mean().item(), "loss": loss_sum / max(1, len(features)),
              "n": len(features)}
    if num_classes:
        result["macro_f1"] = macro_f1(predictions, labels, num_classes)
    return result


def _evaluate_generation(model, features, batch_size, pad_id, tokenizer) -> dict:
    if tokenizer is None:
        raise ValueError("evaluating a generation task needs the tokenizer")
    em = f1 = loss_sum = 0.0
    for _, batch in eval_batches(features, batch_size, pad_id):
        loss_sum += -model(batch)[:, 0].sum().item()
        for prediction, answers in zip(greedy_answers(model, batch["prompts"], tokenizer), batch["answers"]):
            em += exact_match(prediction, answers)
            f1 += token_f1(prediction, answers)
    n = max(1, len(features))
    return {"exact_match": em / n, "f1": f1 / n, "loss": loss_sum / n, "n": len(features)}


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
