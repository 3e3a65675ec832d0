"""Tasks, their data files, and batches."""

from ftkit.data.dataset import Example, TaskData, load_task_data, task_spec

__all__ = ["Example", "TaskData", "load_task_data", "task_spec"]
