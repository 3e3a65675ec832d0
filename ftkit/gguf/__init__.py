"""GGUF files (llama.cpp's format) in and out: their block layouts as ftkit layers (layout.py), their tensor names
(names.py), reading a model without requantizing it and writing one back."""
