"""Which GGUF file a model name stands for: a path to a `.gguf` file, or a packaged model that ships as one."""

from __future__ import annotations

import os
from pathlib import Path

# packaged model name -> the function that finds its GGUF file (ftkit.models.packaged)
PACKAGED_GGUF = {"smollm2-135m": "smollm2_gguf"}


def gguf_file(name: str | None) -> Path | None:
    """The GGUF file behind `model.name`, or None for a model that is not one (a hub id, a directory, a config)."""
    if name in PACKAGED_GGUF:
        from ftkit.models import packaged

        return getattr(packaged, PACKAGED_GGUF[name])()
    if name and name.endswith(".gguf"):
        return Path(os.path.expanduser(name))
    return None
