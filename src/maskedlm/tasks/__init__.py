"""Downstream tasks on labelled data, shared by fine-tuning (finetune.py) and linear probing (probe.py).

read.py reads labelled files, encode.py turns examples into token rows, task.py holds the Task objects (classify,
regress, tokens) that carry every difference between tasks, load.py reads and encodes a task's files, metrics.py
scores predictions, heads.py holds the task heads shaped as transformers' classes (imported only where a head is built).
"""

from maskedlm.tasks.load import TaskData, load_task
from maskedlm.tasks.task import TASKS, Task, get_task

__all__ = ["TASKS", "Task", "TaskData", "get_task", "load_task"]
