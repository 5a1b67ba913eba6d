"""Tasks: what a student learns and how its answers are checked.

Importing this package registers the built-in tasks: ``arithmetic``, ``jsonl`` and ``mahjong``
(with sub-tasks ``mahjong:waits``, ``mahjong:shanten``, ``mahjong:complete``, ``mahjong:discard``,
``mahjong:score``). Add your own with ``@register_task("name")``.
"""

from stratos.tasks.base import (
    TASKS,
    Example,
    Score,
    Split,
    Task,
    TaskError,
    corpus,
    get_task,
    grade,
    messages,
    register_task,
    split_of,
    task_from_spec,
    to_records,
)
from stratos.tasks import arithmetic as _arithmetic  # noqa: F401  (registers the tasks)
from stratos.tasks import jsonl as _jsonl  # noqa: F401
from stratos.tasks import mahjong as _mahjong  # noqa: F401

__all__ = [
    "TASKS", "Example", "Score", "Split", "Task", "TaskError", "corpus", "get_task", "grade", "messages", "register_task",
    "split_of", "task_from_spec", "to_records",
]
