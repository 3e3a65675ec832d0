"""GGUF files (llama.cpp's format) in and out: their block layouts as ftkit layers (layout.py), their tensor names
(names.py), reading a model without requantizing it and writing one back."""

from ftkit.gguf import kquant_layout  # noqa: E402,F401  (registers the K-quants' layouts)
