"""Data: SST-2 from $FTKIT_DATA_DIR, recipe-defined tasks over local files, sampling, batches, and clear errors."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_recipe

from ftkit.data.batches import TrainStream, collate, encode
from ftkit.data.dataset import load_task_data
from ftkit.errors import DataError
from ftkit.models.load import load_tokenizer
from ftkit.recipe import load_recipe, recipe_from_dict


def recipe_of(data: dict, source=None):
    recipe = recipe_from_dict(tiny_recipe(data=data))
    recipe.source = source
    return recipe


def test_sst2_full_splits_from_data_dir():
    recipe = recipe_of({"n_train": None, "n_dev": None})
    task = load_task_data(recipe)
    assert len(task.splits["train"]) == 67349 and len(task.splits["dev"]) == 872
    assert "test" not in task.splits  # GLUE's SST-2 test split is unlabelled and not shipped
    assert sum(e.label for e in task.splits["dev"]) == 444  # 444 positive, 428 negative (data README)
    assert task.splits["dev"][0].texts == ("it 's a charming and often affecting journey .",)
    assert task.label_words == ["terrible", "great"]


def test_mezo_sampling_is_disjoint_seeded_and_moves_validation_to_test():
    recipe = recipe_of({"n_train": 100, "n_dev": 50, "data_seed": 3})
    task = load_task_data(recipe)
    assert len(task.splits["train"]) == 100 and len(task.splits["dev"]) == 50 and len(task.splits["test"]) == 872
    train = {e.texts for e in task.splits["train"]}
    assert not train & {e.texts for e in task.splits["dev"]}
    again = load_task_data(recipe)
    assert [e.texts for e in again.splits["train"]] == [e.texts for e in task.splits["train"]]
    other = load_task_data(recipe_of({"n_train": 100, "n_dev": 50, "data_seed": 4}))
    assert {e.texts for e in other.splits["train"]} != train


def test_sampling_more_than_available_is_refused(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("sentence\tlabel\na\t0\nb\t1\n")
    with pytest.raises(DataError, match="n_train \\+ data.n_dev = 5 is more than the 2 training rows"):
        load_task_data(recipe_of({"train_file": str(path), "n_train": 3, "n_dev": 2}))


def own_task(tmp_path, name, text, **extra):
    path = tmp_path / name
    path.write_text(text)
    spec = {"train": str(path), "dev": str(path), "text_columns": ["review"], "label_column": "stars",
            "label_words": {"neg": "bad", "pos": "good"}, **extra}
    return recipe_of({"task": "reviews", "tasks": {"reviews": spec}, "n_train": None, "n_dev": None})


@pytest.mark.parametrize("name, text", [
    ("r.tsv", "review\tstars\nfine film\tpos\n\"awful\" one\tneg\n"),
    ("r.csv", 'review,stars\nfine film,pos\n"""awful"" one",neg\n'),
    ("r.jsonl", json.dumps({"review": "fine film", "stars": "pos"}) + "\n"
     + json.dumps({"review": '"awful" one', "stars": "neg"}) + "\n"),
])
def test_recipe_defined_task_reads_each_format(tmp_path, name, text):
    task = load_task_data(own_task(tmp_path, name, text))
    assert [(e.texts, e.label) for e in task.splits["train"]] == [(("fine film",), 1), (('"awful" one',), 0)]


def test_missing_file_names_the_key_and_path(tmp_path):
    recipe = own_task(tmp_path, "r.tsv", "review\tstars\n")
    recipe.data.tasks["reviews"].train = str(tmp_path / "nope.tsv")
    with pytest.raises(DataError, match=r"data.tasks.reviews.train: data file not found: .*nope.tsv"):
        load_task_data(recipe)


def test_missing_column_names_file_and_columns(tmp_path):
    recipe = own_task(tmp_path, "r.tsv", "text\tstars\nfine\tpos\n")
    with pytest.raises(DataError, match=r"r.tsv: column 'review' not found \(columns: text, stars\)"):
        load_task_data(recipe)


def test_unknown_label_names_the_line(tmp_path):
    recipe = own_task(tmp_path, "r.tsv", "review\tstars\nfine\tpos\nhmm\tmeh\n")
    with pytest.raises(DataError, match=r"r.tsv: line 3: label 'meh' is not one of neg, pos"):
        load_task_data(recipe)


def test_ragged_row_names_the_line(tmp_path):
    recipe = own_task(tmp_path, "r.tsv", "review\tstars\nfine\tpos\textra\n")
    with pytest.raises(DataError, match="line 2 has 3 fields, the header has 2"):
        load_task_data(recipe)


def test_missing_builtin_data_says_where_it_looked(monkeypatch):
    monkeypatch.setenv("FTKIT_DATA_DIR", "/nonexistent")
    with pytest.raises(DataError, match=r"sst2 train data not found: looked in /nonexistent/sst2/train.tsv; the hub"):
        load_task_data(recipe_of({}))


def test_relative_paths_resolve_beside_the_recipe(tmp_path, write_recipe):
    (tmp_path / "r.tsv").write_text("review\tstars\nfine\tpos\nbad\tneg\n")
    spec = {"train": "r.tsv", "text_columns": ["review"], "label_column": "stars",
            "label_words": {"neg": "bad", "pos": "good"}}
    path = write_recipe(tiny_recipe(data={"task": "reviews", "tasks": {"reviews": spec}, "n_train": None,
                                          "n_dev": None}))
    task = load_task_data(load_recipe(path), splits=("train",))
    assert len(task.splits["train"]) == 2


@pytest.mark.parametrize("grouped", [False, True])
def test_train_stream_covers_each_epoch_and_resumes_exactly(grouped):
    features = [{"input_ids": [101, i] + [7] * (i % 5), "attention_mask": [1] * (2 + i % 5), "labels": i % 2}
                for i in range(10)]
    stream = TrainStream(features, batch_size=4, seed=7, pad_id=0, group_by_length=grouped)
    seen = [stream.next_batch()["input_ids"][:, 1].tolist() for _ in range(3)]
    assert sorted(seen[0] + seen[1] + seen[2][:2]) == list(range(10))  # one epoch, then the next begins
    state = stream.state_dict()
    expected = [stream.next_batch()["input_ids"][:, 1].tolist() for _ in range(5)]
    resumed = TrainStream(features, batch_size=4, seed=7, pad_id=0, group_by_length=grouped)
    resumed.load_state_dict(state)
    assert [resumed.next_batch()["input_ids"][:, 1].tolist() for _ in range(5)] == expected


def test_length_grouping_cuts_padding_on_sst2():
    recipe = recipe_of({"n_train": 2000, "n_dev": None})
    task = load_task_data(recipe, splits=("train",))
    features = encode(task.splits["train"], load_tokenizer(recipe.model), "encoder", task, 64)
    padded = {}
    for grouped in (False, True):
        stream = TrainStream(features, batch_size=32, seed=0, pad_id=0, group_by_length=grouped)
        padded[grouped] = sum(stream.next_batch()["input_ids"].numel() for _ in range(40))
    assert padded[True] < 0.5 * padded[False]


def test_collate_pads_right_with_mask():
    batch = collate([{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": 0},
                     {"input_ids": [4], "attention_mask": [1], "labels": 1}], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [0, 1]


def test_causal_lm_candidates_keep_the_answer_when_truncated():
    recipe = recipe_of({})
    task = load_task_data(recipe, splits=("dev",))
    tokenizer = load_tokenizer(recipe.model)
    long = task.splits["dev"][:1]
    long[0].texts = ("word " * 200,)
    (feature,) = encode(long, tokenizer, "causal_lm", task, max_seq_len=16)
    # single-token label words: the prompt alone, cut to leave the label word's place
    (row,) = feature["rows"]
    words = [tokenizer(" " + word, add_special_tokens=False)["input_ids"] for word in task.label_words]
    assert len(row) == 15 and all(len(w) == 1 for w in words) and feature["next_tokens"] == [w[0] for w in words]
    batch = collate([feature], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (1, 15) and batch["next_tokens"].tolist() == [feature["next_tokens"]]
    # the general layout, a row per candidate: the same prompt, then the candidate
    (general,) = encode(long, tokenizer, "causal_lm", task, 16, one_row_per_candidate=True)
    for row, mask, answer in zip(general["rows"], general["option_masks"], words):
        assert len(row) == 16 and row == feature["rows"][0] + answer and mask == [0] * 15 + [1]
    batch = collate([general], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, 16) and batch["labels"].tolist() == [long[0].label]
    assert batch["option_mask"].sum(1).tolist() == [1, 1]
