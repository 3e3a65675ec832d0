"""Task kinds, declared in `TASK_KINDS` (torch-free; see ftkit.components.TaskKind): how a row becomes an example,
which candidates a causal LM scores after the prompt, the training loss, and how a split is evaluated and with
which metrics. One module per kind holds its behaviour."""

from __future__ import annotations

from ftkit.components import Hook, Registry, TaskKind


def _check_classification(spec, fail) -> None:
    if len(spec.label_words) < 2:
        fail("label_words", "needs at least two labels, e.g. {0: terrible, 1: great}")
    if spec.label_phrases is not None and set(spec.label_phrases) != set(spec.label_words):
        fail("label_phrases", "must name the same labels as label_words")


def _check_multiple_choice(spec, fail) -> None:
    if not spec.candidates_column:
        fail("candidates_column", "a multiple_choice task needs the column holding its candidates")


def _check_generation(spec, fail) -> None:
    if not spec.answer_column:
        fail("answer_column", "a generation task needs the column holding its reference answers")
    if spec.max_new_tokens < 1:
        fail("max_new_tokens", f"must be at least 1, got {spec.max_new_tokens}")


def _kind(name: str, summary: str, metrics: tuple, columns, validate, loss: str, score: str, combine: str,
          extra_features: str | None = None, encoders: bool = False, label_words: bool = False,
          ranks_candidates: bool = False) -> TaskKind:
    module = f"ftkit.task_kinds.{name}"
    return TaskKind(name, summary, metrics, columns=columns, validate=validate,
                    make_example=Hook(f"{module}:make_example"), candidates=Hook(f"{module}:candidates"),
                    loss=Hook(loss), score=Hook(score), combine=Hook(combine),
                    extra_features=Hook(extra_features) if extra_features else None, encoders=encoders,
                    label_words=label_words, ranks_candidates=ranks_candidates)


CANDIDATES = "ftkit.task_kinds.scoring"
TASK_KINDS: Registry = Registry("kind", [
    _kind("classification", "a label per row, named by a word that causal LMs score after the prompt",
          ("accuracy", "macro_f1"), lambda spec: [spec.label_column], _check_classification,
          loss=f"{CANDIDATES}:candidates_loss", score=f"{CANDIDATES}:score_candidates",
          combine="ftkit.task_kinds.classification:combine", encoders=True, label_words=True, ranks_candidates=True),
    _kind("multiple_choice", "each row brings its candidates; the index of the correct one is its label",
          ("accuracy",), lambda spec: [spec.candidates_column, spec.label_column], _check_multiple_choice,
          loss=f"{CANDIDATES}:candidates_loss", score=f"{CANDIDATES}:score_candidates",
          combine=f"{CANDIDATES}:combine_candidates", ranks_candidates=True),
    _kind("generation", "a reference answer per row: trained on its tokens, evaluated by greedy decoding",
          ("exact_match", "f1"), lambda spec: [spec.answer_column], _check_generation,
          loss="ftkit.task_kinds.generation:answer_loss", score="ftkit.task_kinds.generation:score",
          combine="ftkit.task_kinds.generation:combine",
          extra_features="ftkit.task_kinds.generation:extra_features"),
])
