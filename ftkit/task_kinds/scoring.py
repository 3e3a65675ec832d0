"""Scoring candidates: shared by classification (the label words) and multiple choice (each row's candidates).
A model's output is one score per candidate (a causal LM's log-probabilities after the prompt under data.scoring, or an
encoder head's logits)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def candidates_loss(scores: torch.Tensor, batch: dict) -> torch.Tensor:
    """Cross-entropy over the candidates' scores."""
    return F.cross_entropy(scores, batch["labels"])


def score_candidates(model, indices: list[int], batch: dict, tokenizer) -> dict:
    """Predictions and loss under the model's scoring; a causal LM's predictions under every scoring besides, from
    the same forward pass (ftkit.models.heads.SCORINGS)."""
    chosen = getattr(model, "scoring", None)  # encoders' heads have one way to score
    by_scoring = model.scores(batch) if chosen is not None else {}
    logits = by_scoring[chosen] if chosen is not None else model(batch)
    return {"indices": indices, "predictions": logits.argmax(-1).tolist(), "labels": batch["labels"].tolist(),
            "loss_sum": F.cross_entropy(logits, batch["labels"], reduction="sum").item(),
            "predictions_by": {name: scores.argmax(-1).tolist() for name, scores in by_scoring.items()}}


def gather_predictions(results: list[dict], n: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(predictions, labels, summed loss) of a split from its batches' results, in example order."""
    predictions = torch.empty(n, dtype=torch.long)
    labels = torch.empty(n, dtype=torch.long)
    loss_sum = 0.0
    for r in results:
        predictions[r["indices"]] = torch.tensor(r["predictions"], dtype=torch.long)
        labels[r["indices"]] = torch.tensor(r["labels"], dtype=torch.long)
        loss_sum += r["loss_sum"]
    return predictions, labels, loss_sum


def combine_candidates(results: list[dict], n: int, num_classes: int) -> dict:
    """Accuracy and the mean cross-entropy over the candidates."""
    predictions, labels, loss_sum = gather_predictions(results, n)
    metrics = {"accuracy": (predictions == labels).float().mean().item(), "loss": loss_sum / max(1, n), "n": n}
    for name in results[0].get("predictions_by", {}) if results else ():  # accuracy_mean, accuracy_sum, ...
        by_name = [{**r, "predictions": r["predictions_by"][name]} for r in results]
        metrics[f"accuracy_{name}"] = (gather_predictions(by_name, n)[0] == labels).float().mean().item()
    return metrics
