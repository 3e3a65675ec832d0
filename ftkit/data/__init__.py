"""Tasks and their data: built-in tasks (tasks.py, torch-free declarations), reading files (files.py), examples per
split (dataset.py), and batches (batches.py)."""
