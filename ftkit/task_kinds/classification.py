"""Classification: a label per row, one of the task's label values; causal LMs score each label word after the
prompt, encoders classify with a head."""

from __future__ import annotations

import torch

from ftkit.data.dataset import Example, after_prompt, label_text, texts_of
from ftkit.data.files import LINE
from ftkit.errors import DataError
from ftkit.task_kinds.scoring import combine_candidates, gather_predictions


def make_example(row: dict, spec, labels: list[str], source: str, task: str) -> Example:
    value = label_text(row[spec.label_column])
    if value not in labels:
        raise DataError(f"{source}: line {row[LINE]}: label {value!r} is not one of {', '.join(labels)} "
                        f"(the labels of task {task}; add it to label_words)")
    return Example(texts=texts_of(row, spec), label=labels.index(value))


def candidates(task, tokenizer):
    """Every example is scored on the label words, each as it follows the prompt (ftkit.data.dataset.after_prompt)."""
    words = [tokenizer(after_prompt(task, word), add_special_tokens=False)["input_ids"] for word in task.label_words]
    return lambda example: words


def combine(results: list[dict], n: int, num_classes: int) -> dict:
    """Accuracy, macro-F1 over the classes and the mean cross-entropy."""
    metrics = combine_candidates(results, n, num_classes)
    predictions, labels, _ = gather_predictions(results, n)
    return {**metrics, "macro_f1": macro_f1(predictions, labels, num_classes)}


def macro_f1(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    scores = []
    for c in range(num_classes):
        tp = ((predictions == c) & (labels == c)).sum().item()
        fp = ((predictions == c) & (labels != c)).sum().item()
        fn = ((predictions != c) & (labels == c)).sum().item()
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / num_classes
