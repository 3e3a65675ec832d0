"""Models: loading backbones and tokenizers, task heads, assembly, and parameter counts."""
