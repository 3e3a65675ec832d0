"""Load a backbone and its tokenizer: the packaged MiniLM, a hub id, a local directory, a GGUF file
(ftkit.gguf.read; the packaged SmolLM2 under GGUF's own formats, ftkit.gguf.source.model_file), or a config
(random init).

Nothing here reaches the network unless the recipe names a hub id that is not cached; remote code stays off
unless the recipe turns it on.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from ftkit.devices import CPU
from ftkit.errors import UserError, first_line
from ftkit.models.packaged import PACKAGED
from ftkit.quant import FORMATS
from ftkit.recipe.architecture import ENCODER_TYPES
from ftkit.recipe.schema import ModelSpec, QuantSpec

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_source(name: str) -> str:
    """Map a model name to what transformers' from_pretrained accepts: a packaged model's directory
    (ftkit.models.packaged), else the hub id or local path as given."""
    if name in PACKAGED:
        return str(PACKAGED[name]())
    return os.path.expanduser(name)


def gguf_source(spec: ModelSpec, quant: QuantSpec | None) -> Path | None:
    """The GGUF file the model's config, tokenizer and weights come from, or None (ftkit.gguf.source.model_file)."""
    from ftkit.gguf.source import model_file

    return model_file(spec.name, quant.format if quant is not None else None)


def load_config(spec: ModelSpec, quant: QuantSpec | None = None):
    """The architecture config, without any weights: from `model.config` if given, else from `model.name` (read
    under `quant`: a packaged GGUF model under GGUF's formats is read from its file)."""
    if spec.config is None and gguf_source(spec, quant) is not None:
        from ftkit.gguf.read import file_config

        return file_config(gguf_source(spec, quant))
    if spec.config is not None:
        options = dict(spec.config)
        model_type = options.pop("model_type")
        try:
            return AutoConfig.for_model(model_type, **options)
        except (ValueError, KeyError) as err:
            raise UserError(f"model.config: cannot build a '{model_type}' config: {err}") from None
    try:
        return AutoConfig.from_pretrained(
            resolve_source(spec.name), revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise _load_error(spec, spec.name, err) from None


def model_kind(spec: ModelSpec, config) -> str:
    if spec.kind != "auto":
        return spec.kind
    return "encoder" if config.model_type in ENCODER_TYPES else "causal_lm"


def load_tokenizer(spec: ModelSpec, quant: QuantSpec | None = None):
    """The tokenizer of `model.tokenizer`, else of `model.name` (a GGUF file's from its metadata, as load_config)."""
    source = spec.tokenizer or ("minilm" if spec.config is not None and spec.name == "minilm" else spec.name)
    gguf = gguf_source(replace(spec, name=source), quant)
    try:
        if gguf is not None:
            from ftkit.gguf.read import file_tokenizer

            tokenizer = file_tokenizer(gguf)
        else:
            tokenizer = AutoTokenizer.from_pretrained(
                resolve_source(source), revision=spec.revision, trust_remote_code=spec.trust_remote_code
            )
    except (OSError, ValueError) as err:
        raise _load_error(spec, source, err, "the tokenizer from ") from None
    if tokenizer.pad_token_id is None:
        # Causal LMs often have no pad token; padded positions are masked, so any id will do.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_backbone(spec: ModelSpec, kind: str, vocab_size: int | None = None, quant: QuantSpec | None = None,
                  device: torch.device = CPU):
    """The transformer without a task head (encoders) or with its LM head (causal LMs), built or loaded straight
    onto `device`.

    With a low-bit `quant` format the model is built and quantized module by module on the device (ftkit.quant.convert),
    so its full-precision weights never all exist at once, on the host or on the device.
    """
    auto = AutoModel if kind == "encoder" else AutoModelForCausalLM
    dtype = DTYPES[spec.dtype]
    random_init = random_weights(spec)
    if not random_init and spec.config is not None:
        spec = replace(spec, config=None)  # pretrained weights come with their own config
    gguf = None if random_init else gguf_source(spec, quant)
    if gguf is not None:
        from ftkit.gguf.read import load_gguf_backbone

        model = load_gguf_backbone(gguf, auto, load_config(spec, quant), quant or QuantSpec(), dtype,
                                   skip_prefix="encoder." if kind == "encoder" else "lm.", device=device)
    elif quant is not None and FORMATS[quant.format].low_bit:
        from ftkit.quant.convert import load_quantized_backbone

        config = load_config(spec, quant)
        if spec.config is not None and vocab_size is not None and "vocab_size" not in spec.config:
            config.vocab_size = vocab_size
        weights = None if random_init else weights_directory(spec)
        model = load_quantized_backbone(auto, config, quant, dtype, weights,
                                        skip_prefix="encoder." if kind == "encoder" else "lm.", device=device)
    elif random_init:
        config = load_config(spec, quant)
        if vocab_size is not None and (spec.config is None or "vocab_size" not in spec.config):
            config.vocab_size = vocab_size
        with torch.device(device) if device != CPU else nullcontext():  # initialised where it will live
            model = auto.from_config(config, dtype=dtype, trust_remote_code=spec.trust_remote_code)
    else:
        source = resolve_source(spec.name)
        placement = {} if device == CPU else {"device_map": {"": device}}
        try:
            model = auto.from_pretrained(
                source, dtype=dtype, revision=spec.revision, trust_remote_code=spec.trust_remote_code, **placement
            )
        except (OSError, ValueError) as err:
            raise _load_error(spec, spec.name, err) from None
    if kind == "causal_lm":
        model.config.use_cache = False  # no KV cache while training: it only costs memory
    return model


def random_weights(spec: ModelSpec) -> bool:
    return spec.weights == "random" or (spec.weights == "auto" and spec.config is not None)


def weights_directory(spec: ModelSpec) -> Path:
    """The local directory holding a model's safetensors files: the path itself, or the hub cache's snapshot."""
    source = Path(resolve_source(spec.name))
    if source.is_dir():
        return source
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec.name, revision=spec.revision, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as err:  # offline, unknown repository, no access: one clear line
        raise UserError(f"model.name: cannot fetch '{spec.name}': {first_line(err)}") from None


def _load_error(spec: ModelSpec, source: str, err: Exception, what: str = "") -> UserError:
    """One line for a model that does not load; for one that ships its own code, the recipe key that allows it."""
    if "trust_remote_code" in str(err) and not spec.trust_remote_code:
        return UserError(f"model.trust_remote_code: '{source}' ships its own code, which loading it would run; "
                         f"set model.trust_remote_code: true if you trust that code (off, loading executes nothing)")
    key = "model.tokenizer" if what and spec.tokenizer else "model.name"
    return UserError(f"{key}: cannot load {what}'{source}': {first_line(err)}")

