"""Turn a recipe's data section into labelled examples per split.

Files for a built-in task are found in this order: the recipe's explicit path, `$FTKIT_DATA_DIR/<task>/`, then
the Hugging Face hub. A recipe-defined task reads only its own files.
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from ftkit.data import provenance
from ftkit.data.files import LINE, read_rows
from ftkit.data.tasks import BUILTIN_TASKS
from ftkit.errors import DataError, first_line
from ftkit.recipe.schema import Recipe, TaskSpec
from ftkit.task_kinds import TASK_KINDS

SPLITS = ("train", "dev", "test")


@dataclass
class Example:
    texts: tuple[str, ...]
    label: int  # classification: the class; multiple choice: the correct candidate; generation: 0
    candidates: tuple[str, ...] = ()  # multiple choice
    answers: tuple[str, ...] = ()  # generation: every acceptable answer, the first one trained on


@dataclass
class TaskData:
    name: str
    spec: TaskSpec
    labels: list[str]  # label values in class order; class i is labels[i]
    splits: dict[str, list[Example]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # split -> where it was read from
    origins: dict[str, dict] = field(default_factory=dict)  # split as read, before sampling -> ftkit.data.provenance
    chat: bool = False  # the prompt is the user turn of the tokenizer's chat template (data.chat)
    system: str | None = None  # its system message (data.system); None: the template's own behaviour

    @property
    def label_words(self) -> list[str]:
        return [self.spec.label_words[v] for v in self.labels]

    @property
    def label_phrases(self) -> list[str]:
        phrases = self.spec.label_phrases or self.spec.label_words
        return [phrases[v] for v in self.labels]


def task_spec(recipe: Recipe) -> TaskSpec:
    """The recipe's task: built-in or defined under data.tasks, with data.template / data.label_words in place of
    its own."""
    name = recipe.data.task
    spec = recipe.data.tasks[name] if name in recipe.data.tasks else BUILTIN_TASKS[name].spec
    overrides = {key: getattr(recipe.data, key) for key in ("template", "label_words")
                 if getattr(recipe.data, key) is not None}
    return dataclasses.replace(spec, **overrides) if overrides else spec


def task_kind(recipe: Recipe):
    """The recipe's task kind (ftkit.components.TaskKind): its loss, scoring and metrics."""
    return TASK_KINDS[task_spec(recipe).kind]


def load_task_data(recipe: Recipe, splits: tuple[str, ...] = SPLITS, recorded: dict | None = None) -> TaskData:
    """The task's `splits`. `recorded` (ftkit.data.provenance.read_record: a run directory's data record) pins
    each split to the file the run read; without it, the ordinary lookup applies."""
    name = recipe.data.task
    spec = task_spec(recipe)
    data = TaskData(name=name, spec=spec, labels=list(spec.label_words), chat=recipe.data.chat,
                    system=recipe.data.system)
    # With MeZO-style sampling, dev is drawn from train and the validation split becomes the test set, unless the
    # recipe names a test file of its own: that one is the test set, and the validation split is not read when dev
    # is drawn from train.
    sampling = recipe.data.n_train is not None or recipe.data.n_dev is not None
    own_test = explicit_file(recipe, "test") is not None
    wanted = set(splits)
    if sampling:
        wanted = {"train"} | ({"test"} if own_test else set()) | (set() if own_test and recipe.data.n_dev else {"dev"})
    raw = {}
    for split in SPLITS:
        if split in wanted:
            required = split == "train" or (split == "dev" and sampling and not own_test)
            found = _read_split(recipe, name, spec, split, required, recorded)
            if found is not None:
                raw[split], data.sources[split], data.origins[split] = found
    if sampling:
        raw, data.sources = _sample_mezo_style(recipe, raw, data.sources)
    for split, rows in raw.items():
        if split in splits:
            data.splits[split] = _examples(rows, spec, data.labels, data.sources[split], name)
    return data


def explicit_file(recipe: Recipe, split: str) -> str | None:
    """The file the recipe names for `split` (data.<split>_file of a built-in task, data.tasks.<name>.<split> of
    its own), else None."""
    name = recipe.data.task
    if name in recipe.data.tasks:
        return getattr(recipe.data.tasks[name], split)
    return getattr(recipe.data, f"{split}_file")


def split_key(recipe: Recipe, split: str) -> str:
    name = recipe.data.task
    return f"data.tasks.{name}.{split}" if name in recipe.data.tasks else f"data.{split}_file"


def _read_split(recipe: Recipe, name: str, spec: TaskSpec, split: str, required: bool, recorded: dict | None):
    """Return (rows, source, origin) for one split, or None when an optional split is absent."""
    entry = recorded.get(split) if recorded else None
    if entry is not None:
        return _read_recorded(recipe, name, spec, split, entry)
    key = split_key(recipe, split)
    if name in recipe.data.tasks:
        path = getattr(spec, split)
        if path is None:
            return None
        located = _locate(path, recipe)
        return _read_file(located, spec, key), path, provenance.file_origin(located, key)
    builtin = BUILTIN_TASKS[name]
    explicit = getattr(recipe.data, f"{split}_file")
    if explicit:
        located = _locate(explicit, recipe)
        return _read_file(located, spec, key, builtin.prepare), explicit, provenance.file_origin(located, key)
    looked = []
    data_dir = os.environ.get("FTKIT_DATA_DIR")
    if data_dir and split in builtin.files:
        candidate = Path(data_dir) / name / builtin.files[split]
        if candidate.is_file():
            rows = _read_file(candidate, spec, key, builtin.prepare)
            return rows, str(candidate), provenance.file_origin(candidate, key)
        looked.append(str(candidate))
    elif split in builtin.files:
        looked.append(f"$FTKIT_DATA_DIR/{name}/{builtin.files[split]} (FTKIT_DATA_DIR is not set)")
    if split in builtin.hub_splits:
        rows, error, origin = _read_hub(builtin, split, key)
        if rows is not None:
            source = f"hub {builtin.hub_path}/{builtin.hub_name}:{builtin.hub_splits[split]}"
            return _prepared(rows, builtin.prepare, spec, source, list(rows[0]) if rows else []), source, origin
        looked.append(f"the hub ({error})")
    if required:
        raise DataError(f"{name} {split} data not found: looked in {'; '.join(looked)}. "
                        f"Set FTKIT_DATA_DIR or data.{split}_file")
    return None


def _read_recorded(recipe: Recipe, name: str, spec: TaskSpec, split: str, entry: dict):
    """A split read where the run read it: the recorded file (or an identical copy), or the recorded hub split."""
    builtin = BUILTIN_TASKS.get(name) if name not in recipe.data.tasks else None
    prepare = builtin.prepare if builtin else None
    if "hub" in entry and builtin is not None:
        rows, error, origin = _read_hub(builtin, split, entry["key"])
        if rows is None:
            raise DataError(f"{name} {split} data: the run read it from the hub ({entry['hub']}), which cannot be "
                            f"read now ({error}); give the file with {entry['key']}=PATH")
        provenance.check_hub(entry, origin.get("fingerprint"), name, split)
        source = f"hub {builtin.hub_path}/{builtin.hub_name}:{builtin.hub_splits[split]}"
        return _prepared(rows, prepare, spec, source, list(rows[0]) if rows else []), source, origin
    candidates, remedy = [], f"restore it, or give the file to use with {entry['key']}=PATH (ftkit eval)"
    explicit = explicit_file(recipe, split)
    if explicit:
        candidates.append(_locate(explicit, recipe))
    if builtin is not None and split in builtin.files:
        remedy = (f"restore it, set FTKIT_DATA_DIR to a directory holding an identical {name}/"
                  f"{builtin.files[split]}, or give the file to use with {entry['key']}=PATH (ftkit eval)")
        if os.environ.get("FTKIT_DATA_DIR"):
            candidates.append(Path(os.environ["FTKIT_DATA_DIR"]) / name / builtin.files[split])
    path = provenance.intact_file(entry, candidates, name, split, remedy)
    return _read_file(path, spec, entry["key"], prepare), str(path), provenance.file_origin(path, entry["key"])


def _locate(path: str, recipe: Recipe) -> Path:
    candidate = Path(os.path.expanduser(path))
    if not candidate.is_absolute() and not candidate.exists() and recipe.source:
        beside_recipe = Path(recipe.source).parent / candidate
        if beside_recipe.exists():
            return beside_recipe
    return candidate


def _read_file(path: Path, spec: TaskSpec, key: str, prepare=None) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{key}: data file not found: {path}")
    columns, rows = read_rows(path, spec.format)
    return _prepared(rows, prepare, spec, str(path), columns)


def _prepared(rows: list[dict], prepare, spec: TaskSpec, source: str, columns: list) -> list[dict]:
    """Rows in the columns the task reads: a built-in task's `prepare` maps its raw rows (file or hub) first."""
    if prepare is not None:
        for column in prepare.reads:
            if column not in columns:
                raise DataError(f"{source}: column '{column}' not found (columns: {', '.join(map(str, columns))})")
        rows = [{LINE: row.get(LINE), **prepare(row)} for row in rows]
        columns = list(rows[0]) if rows else []
    for column in [*spec.text_columns, *TASK_KINDS[spec.kind].columns(spec)]:
        if column not in columns:
            raise DataError(f"{source}: column '{column}' not found (columns: {', '.join(map(str, columns))})")
    return rows


def _read_hub(builtin, split: str, key: str):
    """(rows, None, origin), or (None, why not, None)."""
    try:
        import datasets

        dataset = datasets.load_dataset(builtin.hub_path, builtin.hub_name, split=builtin.hub_splits[split])
    except Exception as err:  # offline, missing package, unknown dataset: all mean "not here"
        return None, first_line(err)[:120], None
    origin = {"key": key, "hub": builtin.hub_path, "name": builtin.hub_name, "split": builtin.hub_splits[split],
              "fingerprint": getattr(dataset, "_fingerprint", None)}
    return [{LINE: i + 1, **row} for i, row in enumerate(dataset)], None, origin


def _sample_mezo_style(recipe: Recipe, raw: dict, sources: dict):
    """n_train / n_dev examples drawn without overlap from train; the original dev split becomes test."""
    train = raw["train"]
    order = list(range(len(train)))
    random.Random(recipe.data.data_seed).shuffle(order)
    n_dev = recipe.data.n_dev or 0
    if recipe.data.n_train is None and n_dev >= len(train):
        raise DataError(f"data.n_dev = {n_dev} leaves no training rows: {sources['train']} has {len(train)}; set "
                        f"data.n_dev below {len(train)}")
    n_train = recipe.data.n_train or len(train) - n_dev
    if n_train + n_dev > len(train):
        raise DataError(f"data.n_train + data.n_dev = {n_train + n_dev} is more than the {len(train)} training rows "
                        f"in {sources['train']}")
    sampled = {"train": [train[i] for i in order[:n_train]]}
    new_sources = {"train": f"{sources['train']} (sample of {n_train}, seed {recipe.data.data_seed})"}
    if n_dev:
        sampled["dev"] = [train[i] for i in order[n_train:n_train + n_dev]]
        new_sources["dev"] = f"{sources['train']} (held-out sample of {n_dev})"
        test_from = "test" if "test" in raw else "dev"  # the recipe's own test file, else the validation split
        if test_from in raw:
            sampled["test"], new_sources["test"] = raw[test_from], sources[test_from]
    else:
        for split in ("dev", "test"):
            if split in raw:
                sampled[split], new_sources[split] = raw[split], sources[split]
    return sampled, new_sources


def _examples(rows: list[dict], spec: TaskSpec, labels: list[str], source: str, task: str) -> list[Example]:
    make_example = TASK_KINDS[spec.kind].make_example
    return [make_example(row, spec, labels, source, task) for row in rows]


def after_prompt(task, text: str) -> str:
    """A label word, candidate or answer as it follows the prompt: after one space, or directly where the template
    ends a line (MeZO's templates: "...Yes or No?\n" is followed by "Yes", "...It was" by " great") or where the
    prompt is a chat turn (the assistant's reply starts right after its header)."""
    template = task.spec.template or ""
    return text if getattr(task, "chat", False) or template.endswith("\n") else " " + text


def texts_of(row: dict, spec: TaskSpec) -> tuple[str, ...]:
    return tuple(str(row[c]).strip() for c in spec.text_columns)


def text_list(value, separator: str | None) -> tuple[str, ...]:
    """A list column (jsonl, parquet) as it is; a string cut at `separator` (or kept whole without one)."""
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        items = value.tolist() if hasattr(value, "tolist") else value
    else:
        items = str(value).split(separator) if separator else [value]
    return tuple(str(item).strip() for item in items)


def label_text(value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()
