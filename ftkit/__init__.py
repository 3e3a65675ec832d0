"""ftkit: fine-tune language models on a small memory budget."""

__version__ = "0.1.0"
