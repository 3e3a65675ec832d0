"""Multiple choice: each row brings its own candidates (a list, or one string cut at a separator) and the 0-based
index of the correct one. Scored like classification, by the candidates' mean log-probability after the prompt."""

from __future__ import annotations

from ftkit.data.dataset import Example, after_prompt, label_text, text_list, texts_of
from ftkit.data.files import LINE
from ftkit.errors import DataError


def make_example(row: dict, spec, labels: list[str], source: str, task: str) -> Example:
    choices = text_list(row[spec.candidates_column], spec.candidates_separator)
    value = label_text(row[spec.label_column])
    if len(choices) < 2:
        raise DataError(f"{source}: line {row[LINE]}: column '{spec.candidates_column}' holds "
                        f"{len(choices)} candidate(s); a multiple-choice row needs at least two")
    if not value.isdigit() or int(value) >= len(choices):
        raise DataError(f"{source}: line {row[LINE]}: label {value!r} is not the index of one of its "
                        f"{len(choices)} candidates (0 to {len(choices) - 1})")
    return Example(texts=texts_of(row, spec), label=int(value), candidates=choices)


def candidates(task, tokenizer):
    """An example's own candidates, each as it follows the prompt (ftkit.data.dataset.after_prompt)."""
    return lambda example: [tokenizer(after_prompt(task, c), add_special_tokens=False)["input_ids"]
                            for c in example.candidates]
