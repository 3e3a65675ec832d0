"""Which GGUF file a model name stands for: a path to a `.gguf` file, or a packaged model that ships as one; and
whether a recipe reads its model from that file."""

from __future__ import annotations

import os
from pathlib import Path

from ftkit.quant import FORMATS
from ftkit.recipe.architecture import PACKAGED_GGUF_MODELS

# packaged model name -> the function that finds its GGUF file (ftkit.models.packaged)
PACKAGED_GGUF = {"smollm2-135m": "smollm2_gguf"}
assert set(PACKAGED_GGUF) == set(PACKAGED_GGUF_MODELS)


def gguf_file(name: str | None) -> Path | None:
    """The GGUF file behind `model.name`, or None for a model that is not one (a hub id, a directory, a config)."""
    if name in PACKAGED_GGUF:
        from ftkit.models import packaged

        return getattr(packaged, PACKAGED_GGUF[name])()
    if name and name.endswith(".gguf"):
        return Path(os.path.expanduser(name))
    return None


def model_file(name: str | None, fmt: str | None) -> Path | None:
    """The GGUF file whose config, tokenizer and tensors a model is read from under `quant.format` `fmt`: a `.gguf`
    path always; a packaged GGUF model under `gguf` or a format GGUF files hold (ftkit.gguf.layout.LAYOUTS), so that
    its own blocks are taken as they are. Under any other format (none, int4, ...) a packaged model is read from
    its converted directory (ftkit.models.packaged), as it always was."""
    if name and name.endswith(".gguf"):
        return gguf_file(name)
    if name in PACKAGED_GGUF and fmt is not None:
        from ftkit.gguf.layout import LAYOUTS

        return gguf_file(name) if FORMATS[fmt].from_file or fmt in LAYOUTS else None
    return None
