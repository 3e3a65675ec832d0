"""Compare the trained tensors of two run directories (or step directories) bit for bit.

    python scripts/compare_checkpoints.py runs/quzo_int4_sst2 rebuilt

Prints how many tensors and bytes each holds, how many differ, and exits non-zero when any does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from ftkit.training import checkpoint as ckpt


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    step_dir = path if (path / ckpt.WEIGHTS).is_file() else ckpt.resolve(path / "checkpoints", "last")
    if step_dir is None:
        sys.exit(f"no checkpoint under {path}")
    return load_file(str(step_dir / ckpt.WEIGHTS))


def main() -> None:
    a, b = (weights_of(Path(p)) for p in sys.argv[1:3])
    as_bytes = lambda t: t.contiguous().view(torch.uint8)  # noqa: E731
    differ = sorted(k for k in set(a) | set(b) if k not in a or k not in b or not torch.equal(as_bytes(a[k]), as_bytes(b[k])))
    nbytes = sum(t.numel() * t.element_size() for t in a.values())
    print(f"{len(a)} tensors, {nbytes:,} bytes; {len(differ)} differ" + (f": {differ[:5]}" if differ else
                                                                          " (bit-identical)"))
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
