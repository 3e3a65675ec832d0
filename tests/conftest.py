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


# --- tolerances that scale with the sums compared ---------------------------------------------------------------

EPS32 = float(__import__("torch").finfo(__import__("torch").float32).eps)


def assert_sums_close(actual, expected, magnitude, terms: int, what: str = "") -> None:
    """`actual` and `expected` compute the same sums of `terms` products each in float32, in different orders (another
    matmul path, blocking or thread split). `magnitude` is the same sums over absolute values (|x| @ |W|). Rounding
    bounds each result's error by terms * u * magnitude (u = eps / 2, to first order), so the two differ by at most
    terms * eps * magnitude: a tolerance that grows with the size of the sum, and holds on any machine."""
    import torch

    bound = terms * EPS32 * magnitude.to(torch.float32) + 1e-30
    excess = ((actual - expected).abs() / bound).max().item()
    assert excess <= 1.0, f"{what}: a difference {excess:.3g} times the rounding bound of {terms}-term sums"


def tt_magnitude(layer):
    """The matrix a TT layer builds from the absolute values of its cores: the magnitude of its products."""
    import torch

    with torch.no_grad():
        full = layer.cores[0].abs().reshape(layer.shape[0], layer.ranks[1])
        for core in layer.cores[1:]:
            full = (full @ core.abs().reshape(core.shape[0], -1)).reshape(-1, core.shape[2])
        return full.reshape(layer.in_features, layer.out_features)


def tt_terms(layer) -> int:
    """An upper bound on the products summed into one output of a TT layer applied to an input, whichever way it
    is computed: the input's length plus every inner dimension of the chain of core products."""
    return layer.in_features + sum(n * r for n, r in zip(layer.shape, layer.ranks[1:])) + 1


@pytest.fixture(scope="session")
def two_process_runs(request, tmp_path_factory):
    """The two-process runs the selected tests' modules registered (tests/two_processes.py), in one torchrun launch."""
    from two_processes import launch

    return launch({item.module.__name__ for item in request.session.items}, tmp_path_factory.mktemp("two"))
