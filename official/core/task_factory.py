"""Tasks by name: the one registry a runner looks them up in.

A task class registers itself with `@register_task("name")` when its module
is imported; configuration then names it (in Gin: ``task.name = 'name'``), so
choosing a task never means testing a dataset name in the runner.
"""

from __future__ import annotations

from typing import Dict, Type

_TASKS: Dict[str, type] = {}


def register_task(name: str):
    """Class decorator: makes the task class available as `name`."""

    def register(cls: Type) -> Type:
        existing = _TASKS.get(name)
        if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"task {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        _TASKS[name] = cls
        cls.task_name = name
        return cls

    return register


def get_task_cls(name: str) -> Type:
    """The task class registered as `name`, or a ValueError listing the known ones."""
    try:
        return _TASKS[name]
    except KeyError:
        raise ValueError(
            f"unknown task.name {name!r}; registered tasks: {', '.join(sorted(_TASKS)) or 'none'} "
            "(a task of your own must be imported first, e.g. with a Gin `import` statement)"
        ) from None


def registered_tasks() -> list:
    return sorted(_TASKS)
