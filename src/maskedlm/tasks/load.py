"""A task's labelled files read, checked and encoded once: TaskData, what fine-tuning and probing both start from.

The label set comes from the train file; eval (and test, when it has labels) may hold no label train lacks.
"""

from __future__ import annotations

from dataclasses import dataclass

from maskedlm.errors import UserError
from maskedlm.tasks.encode import Encoded
from maskedlm.tasks.read import Examples, read_examples
from maskedlm.tasks.task import Task, get_task


@dataclass
class TaskData:
    """A task read and encoded: its label names and, per split (train, eval, test), the examples and their rows."""

    task: Task
    names: list[str]
    examples: dict[str, Examples]
    encoded: dict[str, Encoded]


def load_task(tok, special, task, files: dict, text_field: str | None, pair_field: str | None,
              label_field: str | None, max_len: int, warn=print) -> TaskData:
    """Read and encode the labelled files {"train": path, "eval": path, "test": path or None} for `task` (a Task or
    its name); fields left None take the task's default columns."""
    task = get_task(task, "--task")
    if pair_field and not task.pairs:
        raise UserError(f"--text-pair-field does not apply to --task {task.name}")
    text_field, label_field = text_field or task.text_field, label_field or task.label_field
    examples = {name: read_examples(path, task, text_field, pair_field, label_field, labels_required=name != "test")
                for name, path in files.items() if path is not None}
    names = task.label_names(examples["train"])
    for ex in examples.values():
        task.check_labels(ex, names, examples["train"].path)
    encoded = {name: task.encode(tok, ex, max_len, special) for name, ex in examples.items()}
    for name, ex in examples.items():
        if encoded[name].truncated:
            warn(f"note: {encoded[name].truncated} of {len(ex.texts)} examples in {ex.path} are longer than "
                 f"{max_len} tokens and were truncated (finetune.max_len)")
    return TaskData(task, names, examples, encoded)
