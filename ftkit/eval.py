"""Evaluation: run a model over a split and compute the task's metric (and the loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ftkit.data.batches import eval_batches


@torch.inference_mode()
def evaluate(model, features: list[dict], batch_size: int, pad_id: int, num_classes: int) -> dict:
    """Accuracy, macro-F1 and mean cross-entropy over `features`, in eval mode (dropout off)."""
    was_training = model.training
    model.eval()
    predictions = torch.empty(len(features), dtype=torch.long)
    labels = torch.empty(len(features), dtype=torch.long)
    loss_sum = 0.0
    for indices, batch in eval_batches(features, batch_size, pad_id):
        logits = model(batch)
        loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        predictions[indices] = logits.argmax(-1)
        labels[indices] = batch["labels"]
    model.train(was_training)
    return {"accuracy": (predictions == labels).float().mean().item(), "macro_f1": macro_f1(predictions, labels, num_classes),
            "loss": loss_sum / max(1, len(features)), "n": len(features)}


def macro_f1(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    scores = []
    for c in range(num_classes):
        tp = ((predictions == c) & (labels == c)).sum().item()
        fp = ((predictions == c) & (labels != c)).sum().item()
        fn = ((predictions != c) & (labels == c)).sum().item()
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / num_classes
