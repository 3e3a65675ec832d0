"""Tests run offline on tiny models and small slices of SST-2 ($FTKIT_DATA_DIR, default ../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not os.environ.get("FTKIT_DATA_DIR"):
    os.environ["FTKIT_DATA_DIR"] = str((REPO.parent / "shared" / "data").resolve())
DATA_DIR = Path(os.environ["FTKIT_DATA_DIR"])
if not (DATA_DIR / "sst2" / "train.tsv").is_file():
    raise RuntimeError(f"SST-2 not found under FTKIT_DATA_DIR={DATA_DIR}: the tests need it (see README)")

# A 2-layer BERT small enough that a training step takes milliseconds; the tokenizer is MiniLM's.
TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 128}
TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "intermediate_size": 64, "max_position_embeddings": 128}
TINY_OPT = {"model_type": "opt", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "ffn_dim": 64, "word_embed_proj_dim": 32, "max_position_embeddings": 128}


def tiny_recipe(**sections) -> dict:
    """A recipe for a tiny random BERT on 64 SST-2 training sentences and 32 held-out ones."""
    recipe = {
        "model": {"name": "minilm", "config": dict(TINY_BERT), "head_init": "random"},
        "method": {"optimizer": "adamw"},
        "data": {"task": "sst2", "max_seq_len": 32, "n_train": 64, "n_dev": 32, "calibration_examples": 16},
        "train": {"max_steps": 12, "batch_size": 8, "lr": 1e-3, "eval_every": 4, "save_every": 4, "log_every": 4,
                  "threads": 1},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return recipe


@pytest.fixture
def write_recipe(tmp_path):
    def write(data: dict, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write
