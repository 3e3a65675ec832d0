"""Answer metrics of generation tasks, with SQuAD's normalisation: lower case, no punctuation, no articles
(a, an, the), single spaces. A prediction is scored against each reference and keeps its best score."""

from __future__ import annotations

import re
import string
from collections import Counter

PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: list[str]) -> float:
    return max(float(normalize_answer(prediction) == normalize_answer(r)) for r in references)


def token_f1(prediction: str, references: list[str]) -> float:
    return max(_f1(normalize_answer(prediction).split(), normalize_answer(r).split()) for r in references)


def _f1(predicted: list[str], reference: list[str]) -> float:
    if not predicted or not reference:
        return float(predicted == reference)
    common = sum((Counter(predicted) & Counter(reference)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(reference)
    return 2 * precision * recall / (precision + recall)
