"""Built-in tasks: where their data lives, how a row reads, and how labels are worded.

The prompts follow MeZO's templates (princeton-nlp/MeZO, large_models/templates.py); the label word, candidate or
answer follows the prompt after one space, or directly where the template ends a line, as in MeZO's code. A task whose raw rows (hub or file) need reshaping first has a
`prepare` step, e.g. COPA's two choice columns become one candidate list and its question picks the connective.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ftkit.recipe.schema import TaskSpec
from ftkit.task_kinds import TASK_KINDS


@dataclass(frozen=True)
class Prepare:
    """Maps a raw row to the columns the task's spec reads; `reads` names the raw columns it needs."""

    reads: tuple[str, ...]
    fn: Callable[[dict], dict]

    def __call__(self, row: dict) -> dict:
        return self.fn(row)


@dataclass(frozen=True)
class BuiltinTask:
    spec: TaskSpec
    hub_path: str
    hub_name: str | None
    # Split -> file name under $FTKIT_DATA_DIR/<task>/ and split name on the hub.
    files: dict[str, str] = field(default_factory=dict)
    hub_splits: dict[str, str] = field(default_factory=dict)
    prepare: Prepare | None = None


SUPERGLUE_FILES = {"train": "train.jsonl", "dev": "val.jsonl"}
HUB_SPLITS = {"train": "train", "dev": "validation"}
YES_NO = {"0": "No", "1": "Yes"}


def _question(text: str) -> str:
    text = text.strip()
    text = text if text.endswith("?") else text + "?"
    return text[0].upper() + text[1:]


def _copa(row: dict) -> dict:
    premise = row["premise"].rstrip()
    premise = premise[:-1] if premise.endswith(".") else premise

    def lower_first(choice: str) -> str:  # "The man..." continues the sentence: "...because the man..."
        words = choice.strip().split(" ")
        words[0] = words[0] if words[0] == "I" else words[0].lower()
        return " ".join(words)

    return {"premise": premise, "connective": "because" if row["question"] == "cause" else "so",
            "choices": [lower_first(row["choice1"]), lower_first(row["choice2"])], "label": row["label"]}


def _record(row: dict) -> dict:
    entities = list(dict.fromkeys(row["entities"]))  # unique, in order
    answers = [a for a in row["answers"] if a in entities]
    # A row whose answer is not among its entities gets label -1, which the loader reports with its line.
    return {"passage": row["passage"], "query": row["query"], "entities": entities,
            "label": entities.index(answers[0]) if answers else -1}


def _squad(row: dict) -> dict:
    return {"title": row["title"], "context": row["context"], "question": row["question"].strip(),
            "answers": list(row["answers"]["text"])}


def _drop(row: dict) -> dict:
    return {"passage": row["passage"], "question": row["question"].strip(), "answers": list(row["answers_spans"]["spans"])}


BUILTIN_TASKS: dict[str, BuiltinTask] = {
    "sst2": BuiltinTask(
        spec=TaskSpec(
            format="tsv",
            text_columns=["sentence"],
            label_column="label",
            label_words={"0": "terrible", "1": "great"},
            # Whole sentences make better prototypes than bare words (71% vs 62% zero-shot on MiniLM).
            label_phrases={"0": "It was terrible.", "1": "It was great."},
            template="{sentence} It was",
            metric="accuracy",
        ),
        hub_path="glue",
        hub_name="sst2",
        files={"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"},
        hub_splits=HUB_SPLITS,
    ),
    "rte": BuiltinTask(
        spec=TaskSpec(format="jsonl", text_columns=["premise", "hypothesis"], label_words={"0": "Yes", "1": "No"},
                      template='{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n'),
        hub_path="super_glue", hub_name="rte", files=SUPERGLUE_FILES, hub_splits=HUB_SPLITS,
    ),
    "cb": BuiltinTask(
        spec=TaskSpec(format="jsonl", text_columns=["premise", "hypothesis"],
                      label_words={"0": "Yes", "1": "No", "2": "Maybe"}, metric="macro_f1",
                      template='Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n'),
        hub_path="super_glue", hub_name="cb", files=SUPERGLUE_FILES, hub_splits=HUB_SPLITS,
    ),
    "boolq": BuiltinTask(
        spec=TaskSpec(format="jsonl", text_columns=["passage", "question"], label_words=YES_NO,
                      template="{passage} {question}"),
        hub_path="super_glue", hub_name="boolq", files=SUPERGLUE_FILES, hub_splits=HUB_SPLITS,
        prepare=Prepare(("passage", "question", "label"), lambda r: {
            "passage": r["passage"], "question": _question(r["question"]), "label": r["label"]}),
    ),
    "wic": BuiltinTask(
        spec=TaskSpec(format="jsonl", text_columns=["sentence1", "sentence2", "word"], label_words=YES_NO,
                      template='Does the word "{word}" have the same meaning in these two sentences? Yes, No?\n'
                               '{sentence1}\n{sentence2}\n'),
        hub_path="super_glue", hub_name="wic", files=SUPERGLUE_FILES, hub_splits=HUB_SPLITS,
    ),
    "wsc": BuiltinTask(
        spec=TaskSpec(format="jsonl", text_columns=["text", "span1_text", "span2_text"], label_words=YES_NO,
                      template='{text}\nIn the previous sentence, does the pronoun "{span2_text}" refer to '
                               '{span1_text}? Yes or No?\n'),
        hub_path="super_glue", hub_name="wsc.fixed", files=SUPERGLUE_FILES, hub_splits=HUB_SPLITS,
        prepare=Prepare(("text", "span1_text", "span2_text", "label"), lambda r: {
            "text": r["text"], "span1_text": r["span1_text"], "span2_text": r["span2_text"].lower(),
            "label": r["label"]}),
    ),
    "copa": BuiltinTask(
        spec=TaskSpec(kind="multiple_choice", format="jsonl", text_columns=["premise", "connective"],
                      candidates_column="choices", template="{premise} {connective}"),
        hub_path="super_glue", hub_name="copa", files=SUPERGLUE_FILES, hub_splits=HUB_SPLITS,
        prepare=Prepare(("premise", "question", "choice1", "choice2", "label"), _copa),
    ),
    "multirc": BuiltinTask(
        spec=TaskSpec(format="jsonl", text_columns=["paragraph", "question", "answer"], label_words=YES_NO,
                      template='{paragraph}\nQuestion: {question}\nI found this answer "{answer}". Is that correct? '
                               'Yes or No?\n'),
        hub_path="super_glue", hub_name="multirc", files=SUPERGLUE_FILES, hub_splits=HUB_SPLITS,
    ),
    "record": BuiltinTask(
        spec=TaskSpec(kind="multiple_choice", format="jsonl", text_columns=["passage", "query"],
                      candidates_column="entities",
                      template='{passage}\n{query}\nQuestion: what is the "@placeholder"\nAnswer:'),
        hub_path="super_glue", hub_name="record", files=SUPERGLUE_FILES, hub_splits=HUB_SPLITS,
        prepare=Prepare(("passage", "query", "entities", "answers"), _record),
    ),
    "squad": BuiltinTask(
        spec=TaskSpec(kind="generation", format="jsonl", text_columns=["title", "context", "question"],
                      answer_column="answers", metric="f1",
                      template="Title: {title}\nContext: {context}\nQuestion: {question}\nAnswer:"),
        hub_path="squad", hub_name=None, files={"train": "train.jsonl", "dev": "validation.jsonl"},
        hub_splits=HUB_SPLITS, prepare=Prepare(("title", "context", "question", "answers"), _squad),
    ),
    "drop": BuiltinTask(
        spec=TaskSpec(kind="generation", format="jsonl", text_columns=["passage", "question"],
                      answer_column="answers", metric="f1",
                      template="Passage: {passage}\nQuestion: {question}\nAnswer:"),
        hub_path="drop", hub_name=None, files={"train": "train.jsonl", "dev": "validation.jsonl"},
        hub_splits=HUB_SPLITS, prepare=Prepare(("passage", "question", "answers_spans"), _drop),
    ),
}


# How a causal LM scores a candidate when data.scoring is auto: built-in tasks keep MeZO's protocol (the mean
# log-probability of the candidate's tokens); tasks defined in a recipe get the sum, which the evidence in docs/tasks.md
# favours once label words differ in length.
BUILTIN_SCORING, RECIPE_TASK_SCORING = "mean", "sum"


def candidate_scoring(data) -> str:
    """The scoring of a data section's task (`data.scoring`, with auto resolved). Tasks whose candidates do not
    compete (generation: trained on the answer's mean log-probability) always use the mean."""
    spec = data.tasks[data.task] if data.task in data.tasks else BUILTIN_TASKS[data.task].spec
    if not TASK_KINDS[spec.kind].ranks_candidates:
        return "mean"
    if data.scoring != "auto":
        return data.scoring
    return RECIPE_TASK_SCORING if data.task in data.tasks else BUILTIN_SCORING
